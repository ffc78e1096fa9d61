"""Start-up check that the installed SGLang is the version sgl-elastic is pinned to."""

from __future__ import annotations

from importlib import metadata

PINNED_SGLANG = "0.5.23"


class SGLangVersionError(RuntimeError):
    pass


def check_sglang_version() -> str:
    """Return the installed SGLang version; raise SGLangVersionError if it is not the pinned one."""
    try:
        version = metadata.version("sglang")
    except metadata.PackageNotFoundError:
        raise SGLangVersionError(
            f"sglang is not installed; sgl-elastic needs sglang=={PINNED_SGLANG} "
            "(run scripts/setup.sh on CPU, or pip install 'sgl-elastic[gpu]')"
        ) from None
    if version != PINNED_SGLANG:
        raise SGLangVersionError(
            f"sgl-elastic is pinned to sglang=={PINNED_SGLANG} but sglang=={version} is installed; "
            f"install the pinned version (pip install sglang=={PINNED_SGLANG})"
        )
    return version
