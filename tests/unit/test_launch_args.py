"""The launcher's argument handling, without starting any process."""

import argparse

import pytest

from sgl_elastic.config import ElasticArgs, parse_widths
from sgl_elastic.launch_server import (
    _strip_elastic_flags,
    build_parser,
    check_model_path,
    cpu_defaults,
    omp_threads_bind,
)


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def test_parse_widths_ok():
    assert parse_widths("3,3,2") == (3, 3, 2)
    assert parse_widths(" 1, 3 ") == (1, 3)


@pytest.mark.parametrize("text,needle", [("3,x,2", "comma-separated integers"), ("2,0,1", ">= 1 unit"),
                                         ("2,-1", ">= 1 unit"), ("", "comma-separated")])
def test_parse_widths_errors(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_widths(text)


def test_widths_count_must_match_tp():
    args = ElasticArgs(tp_widths=(3, 3, 2))
    args.check_tp_size(3)
    with pytest.raises(ValueError, match="gives 3 widths .* --tp-size is 2"):
        args.check_tp_size(2)


def test_bad_policy():
    with pytest.raises(ValueError, match="choose one of equal, capacity"):
        ElasticArgs(width_policy="random")


def test_omp_threads_bind():
    assert omp_threads_bind(1, 2) == "0-1"
    assert omp_threads_bind(2, 2) == "0|1"
    assert omp_threads_bind(3, 2) == "0|1|0"
    assert omp_threads_bind(2, 8) == "0-3|4-7"


def test_cpu_defaults_fill_only_missing(parser):
    extra = cpu_defaults(["--model-path", "m", "--attention-backend=triton", "--device", "cpu"], parser)
    assert "--attention-backend" not in extra and "--device" not in extra
    assert "--disable-cuda-graph" in extra and "--sleep-on-idle" in extra
    full = cpu_defaults(["--model-path", "m"], parser)
    assert full[full.index("--device") + 1] == "cpu"
    assert full[full.index("--attention-backend") + 1] == "torch_native"


def test_elastic_flags_parse_and_strip(parser):
    argv = ["--model-path", "m", "--tp", "3", "--elastic-tp-widths", "2,1,1",
            "--elastic-width-policy=capacity", "--no-elastic-daemon", "--port", "1"]
    args = parser.parse_args(argv)
    assert ElasticArgs.from_cli_args(args) == ElasticArgs(tp_widths=(2, 1, 1), width_policy="capacity")
    assert _strip_elastic_flags(argv, parser) == ["--model-path", "m", "--tp", "3", "--port", "1"]
    # the KV backups are on by default with failover; the flag turns them off and is not SGLang's
    assert ElasticArgs.from_cli_args(args).kv_backup
    argv = ["--model-path", "m", "--tp", "3", "--no-elastic-kv-backup", "--port", "1"]
    assert not ElasticArgs.from_cli_args(parser.parse_args(argv)).kv_backup
    assert _strip_elastic_flags(argv, parser) == ["--model-path", "m", "--tp", "3", "--port", "1"]
    argv = ["--model-path", "m", "--tp", "3", "--ep-size", "3", "--elastic-redundant-experts", "4"]
    assert ElasticArgs.from_cli_args(parser.parse_args(argv)).redundant_experts == 4
    assert _strip_elastic_flags(argv, parser) == ["--model-path", "m", "--tp", "3", "--ep-size", "3"]
    with pytest.raises(ValueError, match="--elastic-redundant-experts -1"):
        ElasticArgs(redundant_experts=-1)


def test_redundant_experts_need_expert_parallelism(tiny_models):
    from sgl_elastic.patches import build_layout

    args = {"model_path": str(tiny_models["mixtral"]), "tp_size": 3, "ep_size": 1}
    with pytest.raises(ValueError, match="needs expert parallelism: --ep-size 3"):
        build_layout(ElasticArgs(redundant_experts=2), args)
    lay = build_layout(ElasticArgs(redundant_experts=2), args | {"ep_size": 3})
    assert lay.family("experts").widths == (4, 3, 3) and lay.family("experts").redundant == 2


def test_check_model_path(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        check_model_path(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="has no config.json"):
        check_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    check_model_path(str(tmp_path))
    check_model_path("Qwen/Qwen3-0.6B")  # a hub id is SGLang's business


@pytest.mark.parametrize("kw,needle", [(dict(node_port=80), "--elastic-node-port 80"),
                                       (dict(node_port=65535), "1024..65533"),
                                       (dict(link_gbps=-1.0), "--elastic-link-gbps -1.0")])
def test_bad_node_flags(kw, needle):
    with pytest.raises(ValueError, match=needle):
        ElasticArgs(**kw)


def test_node_host_of_a_node_needs_an_address():
    from types import SimpleNamespace

    from sgl_elastic.launch_server import _node_host

    args = SimpleNamespace(dist_init_addr="10.1.2.3:5000", host="0.0.0.0")
    assert _node_host(ElasticArgs(), args, 0) == "10.1.2.3"
    assert _node_host(ElasticArgs(node_host="10.1.2.4"), args, 1) == "10.1.2.4"
    assert _node_host(ElasticArgs(), SimpleNamespace(dist_init_addr="10.1.2.3:5000", host="10.1.2.9"), 1) == "10.1.2.9"
    with pytest.raises(ValueError, match="--elastic-node-host"):
        _node_host(ElasticArgs(), args, 1)
