"""Every change sgl-elastic makes to SGLang: one module per patched SGLang module, one table."""
