# ruff: noqa: E501  (the HLO text below keeps XLA's long lines)
"""The CPU-testable parts of the issue-17 benchmark scripts: the per-op profile's HLO-metadata
classification and table, the peer comparison's batch layout and CLI, memory_fit's choice."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import compare_transfusion_pytorch as compare  # noqa: E402
import memory_fit  # noqa: E402
import profile_step as ps  # noqa: E402

A = "jit(train_step)/jvp(Transfusion)/Transfusion._layers/while/body/eval_jaxpr/layers"
B = "jit(train_step)/transpose(jvp(Transfusion))/Transfusion._layers/while/body/eval_jaxpr/layers"


@pytest.mark.parametrize(
    "op_name, cat",
    [
        (f"{A}/attn/bkgts,bskh->btkgh/dot_general", "attention"),
        (f"{B}/attn/pallas_call", "attention"),
        (f"{A}/attn/btd,dxh->btxh/dot_general", "matmuls (dense layers)"),
        (f"{B}/attn/btnh,nhd->btd/transpose", "matmuls (dense layers)"),
        (f"{A}/mlp/gate/dot_general", "matmuls (dense layers)"),
        (f"{A}/attn_norm/mul", "other"),
        (
            "jit(train_step)/jvp(Transfusion)/Transfusion._lm_head/lm_head/dot_general",
            "LM head + losses",
        ),
        ("jit(train_step)/jvp()/reduce_max", "LM head + losses"),
        ("jit(train_step)/transpose(jvp())/mul", "LM head + losses"),
        ("jit(train_step)/transpose(jvp(Transfusion))/patch_out/proj/dot_general", "patch layers"),
        ("jit(train_step)/jvp(Transfusion)/time_embed/fc1/dot_general", "patch layers"),
        (
            "jit(train_step)/jvp(Transfusion)/jit(take_along_axis)/gather",
            "image-slot gathers/scatters",
        ),
        ("jit(train_step)/jvp(Transfusion)/embed/jit(_take)/gather", "other"),
        ("jit(train_step)/jit(tree_bias_correction)/div", "optimizer update"),
        ("jit(train_step)/mul", "optimizer update"),
        ("jit(train_step)/jvp(jit(_normal))/jit(_normal_real)/erf_inv", "other"),
        ("", "other"),
    ],
)
def test_category(op_name, cat):
    assert ps.category(op_name) == cat


HLO = """HloModule jit_train_step

%fused_computation.1 (param_0: f32[8,64], param_1: f32[64,64]) -> f32[8,64] {
  %param_0 = f32[8,64]{1,0} parameter(0)
  %param_1 = f32[64,64]{1,0} parameter(1)
  %dot.1 = f32[8,64]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="A/mlp/up/dot_general"}
  ROOT %add.2 = f32[8,64]{1,0} add(%dot.1, %dot.1), metadata={op_name="A/attn_norm/add"}
}

%fused_computation.2 (param_0.1: f32[8,64]) -> f32[8,64] {
  %param_0.1 = f32[8,64]{1,0} parameter(0)
  %exp.1 = f32[8,64]{1,0} exponential(%param_0.1), metadata={op_name="jit(train_step)/jvp()/exp"}
  %log.1 = f32[8,64]{1,0} log(%exp.1), metadata={op_name="jit(train_step)/jvp()/log"}
  ROOT %mul.1 = f32[8,64]{1,0} multiply(%log.1, %log.1), metadata={op_name="jit(train_step)/mul"}
}

ENTRY %main.9 (p0: f32[8,64], p1: f32[64,64]) -> (f32[8,64], f32[8,64]) {
  %p0 = f32[8,64]{1,0} parameter(0), metadata={op_name="batch[\\'tokens\\']"}
  %p1 = f32[64,64]{1,0} parameter(1)
  %fusion.1 = f32[8,64]{1,0} fusion(%p0, %p1), kind=kOutput, calls=%fused_computation.1, metadata={op_name="A/attn_norm/add"}
  %loop_fusion.2 = f32[8,64]{1,0} fusion(%fusion.1), kind=kLoop, calls=%fused_computation.2, metadata={op_name="jit(train_step)/mul"}
  %while.3 = (s32[], f32[8,64]) while(%t), condition=%cond, body=%body, metadata={op_name="jit(train_step)/while"}
  ROOT %tuple.4 = (f32[8,64]{1,0}, f32[8,64]{1,0}) tuple(%fusion.1, %loop_fusion.2)
}
""".replace("A/", f"{A}/")


def test_parse_and_classify_hlo():
    hlo = ps.parse_hlo(HLO)
    assert hlo["fusion.1"]["calls"] == ["fused_computation.1"]
    assert hlo["dot.1"]["comp"] == "fused_computation.1" and hlo["dot.1"]["opcode"] == "dot"
    assert hlo["while.3"]["opcode"] == "while"
    cats = ps.classify_ops(hlo)
    assert cats["fusion.1"] == "matmuls (dense layers)"  # its dot decides, not its root's name
    assert cats["loop_fusion.2"] == "LM head + losses"  # majority: exp and log over one mul
    assert cats["p0"] == "other"


def _events(device: bool) -> list[dict]:
    pid = 7
    meta = {
        "ph": "M",
        "pid": pid,
        "name": "process_name",
        "args": {"name": "/device:GPU:0" if device else "/host:CPU"},
    }
    ev = [meta]
    ev.append(
        {
            "ph": "X",
            "pid": pid,
            "ts": 0,
            "dur": 3.0,
            "name": "sm90_gemm",
            "args": {"hlo_op": "fusion.1"},
        }
    )
    ev.append({"ph": "X", "pid": pid, "ts": 5, "dur": 1.0, "name": "loop_fusion.2"})  # by name
    ev.append(
        {
            "ph": "X",
            "pid": pid,
            "ts": 9,
            "dur": 2.0,
            "name": "k",
            "args": {"annotation": "hlo_op=fusion.1,hlo_module=m"},
        }
    )
    ev.append(
        {
            "ph": "X",
            "pid": pid,
            "ts": 0,
            "dur": 50.0,
            "name": "while.3",
            "args": {"hlo_op": "while.3"},
        }
    )
    if device:  # host-side launches of the same ops are ignored when a device timeline exists
        ev.append({"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}})
        ev.append(
            {
                "ph": "X",
                "pid": 1,
                "ts": 0,
                "dur": 100.0,
                "name": "x",
                "args": {"hlo_op": "fusion.1"},
            }
        )
    return ev


@pytest.mark.parametrize("device", [False, True])
def test_op_times_and_table(device, tmp_path):
    hlo = ps.parse_hlo(HLO)
    trace = tmp_path / "plugins" / "profile" / "run" / "host.trace.json.gz"
    trace.parent.mkdir(parents=True)
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": _events(device)}, f)
    times = ps.op_times(ps.load_trace(str(tmp_path)), hlo)
    assert times == {"fusion.1": 5.0, "loop_fusion.2": 1.0}  # the while encloses its body: skipped
    summary = ps.summarize(times, ps.classify_ops(hlo), steps=2)
    assert summary["matmuls (dense layers)"]["ms"] == pytest.approx(2.5e-3)
    assert sum(v["share"] for v in summary.values()) == pytest.approx(1.0)
    md = ps.table({"transfusion": summary, "text-only causal": summary})
    assert md.splitlines()[0].count("ms/step") == 2
    assert "| matmuls (dense layers) | 0.00 | 83.3% | 0.00 | 83.3% |" in md
    with pytest.raises(FileNotFoundError, match="perfetto"):
        ps.load_trace(str(tmp_path / "nothing"))


def test_layout_batch_matches_the_peer_layout():
    from tfx_jax.config import load_config

    n = load_config("experiments/tiny.py", []).model.num_patches
    text = 10
    cfg = load_config(
        "experiments/tiny.py", [f"data.seq_len={2 * (text + n)}", "data.global_batch_size=3"]
    )
    b = compare.layout_batch(cfg, np.random.default_rng(0), 2, text)
    assert b["tokens"].shape == (3, 2 * (text + n))
    assert (b["image_ids"] == 1).sum(1).tolist() == [n] * 3
    assert (b["image_ids"] == 2).sum(1).tolist() == [n] * 3
    start = text - 2  # BOI, then the patches, then EOI; the next span's text follows
    assert (b["image_ids"][0, start + 1 : start + 1 + n] == 1).all()
    assert b["image_ids"][0, start] == 0 and b["image_ids"][0, start + n + 1] == 0
    assert (b["segment_ids"] == 1).all() and (
        b["positions"][:, -1] == b["tokens"].shape[1] - 1
    ).all()
    with pytest.raises(ValueError, match="seq_len"):
        compare.layout_batch(cfg, np.random.default_rng(0), 1, text)


def test_compare_cli_rejects_unknown_size():
    p = subprocess.run(
        [sys.executable, str(BENCH / "compare_transfusion_pytorch.py"), "--sizes", "3b"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "'3b' is not one of" in p.stderr


def test_memory_fit_choice_and_markdown():
    pts = [
        {"size": "1.4b", "policy": "full", "batch": 1, "fits": True},
        {"size": "1.4b", "policy": "full", "batch": 8, "fits": True},
        {"size": "1.4b", "policy": "dots_no_batch", "batch": 4, "fits": True},
        {"size": "1.4b", "policy": "dots_no_batch", "batch": 8, "fits": False},
        {"size": "1.4b", "policy": "none", "batch": 1, "fits": False},
    ]
    order = memory_fit.choose(pts)
    assert [(p["policy"], p["batch"]) for p in order] == [("dots_no_batch", 4), ("full", 8)]
    report = {
        "device": "cpu",
        "limit_bytes": 2**34,
        "seq_len": 4096,
        "jax": "x",
        "points": pts,
        "runs": [
            {
                "size": "1.4b",
                "policy": "dots_no_batch",
                "batch": 4,
                "step_ms": 100.0,
                "tokens_per_s": 163840.0,
                "mfu": 0.5,
                "loss": 1.0,
            }
        ],
    }
    md = memory_fit.markdown(report)
    assert "| 1.4b | none | 1 |" in md and "MFU 50.0%" in md
