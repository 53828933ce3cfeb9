"""The per-layer FP8 audit on the tiny model (CPU, bf16).

One end-to-end `python -m minisd35 audit --model tiny` run (a subprocess, with its own model cache) with
--compare and --sensitivity is shared by most tests: it must finish in under 2 minutes, print its JSON summary
last, and write every file readably. Its numbers are then checked against hand computations on a separately loaded
FP8 pipeline (what `generate --fp8` runs): weight error, activation amax and scale, isolated and propagated error of
one layer; PSNR from the two PNGs; the suggested policy, loaded from its file, must reach the error it claims.

The outlier test builds the case the module docstring teaches: one fc2 output row scaled by s and the adaLN gate
row of that channel by 1/s (the same function). E4M3 is a float format, so with s = 100 one scale per tensor costs
nothing (the layer stays in the pack of sensitivities); with s = 1e5 the other rows fall into the subnormals under
per-tensor scaling and the layer becomes by far the most sensitive, while row-wise scaling leaves it in the pack.
The whole-tensor weight error hides all of this; the worst channel's error shows it.
"""

import csv
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minisd35 import audit
from minisd35.cli import main as cli_main
from minisd35.fp8 import FP8Linear, quantize, quantize_weight
from minisd35.pipeline import load_pipeline
from minisd35.weights import load_mmdit

REPO = Path(__file__).resolve().parents[1]
LAYER = "joint_blocks.1.x_block.mlp.fc2"  # w8a8-row under the default policy
COMPARE = ["default", "row", "tensor", "weight-only"]


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The CLI end to end: the tiny model written into a fresh cache, audited with a comparison and sensitivity."""
    tmp = tmp_path_factory.mktemp("audit")
    out = tmp / "out"
    env = {**os.environ, "MINISD35_CACHE": str(tmp / "cache"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "minisd35", "audit", "a green sphere", "--model", "tiny", "--out", str(out),
           "--compare", "row,tensor,weight-only", "--sensitivity", "type", "--seed", "3"]
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return {"proc": proc, "out": out, "seconds": seconds, "cpu": cpu, "summary": summary,
            "root": Path(summary["model"])}


def test_cli_end_to_end(run):
    assert run["seconds"] < 120, f"audit --model tiny took {run['seconds']:.0f} s ({run['cpu']:.0f} s of CPU)"
    last = run["proc"].stdout.strip().splitlines()[-1]
    assert json.loads(last) == run["summary"]
    s = run["summary"]
    assert s["steps"] == 4 and s["height"] == s["width"] == 128 and s["fp8_layers"] == 29 and s["finite"]
    assert 0 < s["latent_rel_rms"] < 0.2 and s["psnr_db"] > 20 and 0 < s["ssim"] <= 1
    assert s["weight_bytes"]["default"] < 0.7 * s["weight_bytes"]["bf16"]
    assert len(s["latent_drift_per_step"]) == 4 and s["latent_drift_per_step"][-1] == pytest.approx(
        s["latent_rel_rms"], rel=1e-5)
    assert "prop err" in run["proc"].stdout  # the table


def test_files_are_written_and_readable(run):
    out, s = run["out"], run["summary"]
    for name in audit.output_names(compare=True, sens=True):
        assert (out / name).is_file(), name
    assert sorted(s["files"]) == sorted(audit.output_names(compare=True, sens=True))
    layers = read_csv(out / "layers.csv")
    assert len(layers) == 29 and {r["recipe"] for r in layers} == {"w8a8-row", "w8-only"}
    assert all(float(r["prop_rel_rms"]) > 0 and float(r["iso_rel_rms"]) > 0 for r in layers)
    steps = read_csv(out / "layer_steps.csv")
    assert len(steps) == 29 * 4 and {int(r["step"]) for r in steps} == {0, 1, 2, 3}
    assert len(read_csv(out / "steps.csv")) == 4
    for r in layers:  # weight-only layers quantise no activations: those cells are empty, the others are numbers
        assert (r["act_scale_max"] == "") == (r["recipe"] == "w8-only")

    bf16, fp8 = Image.open(out / "bf16.png"), Image.open(out / "fp8.png")
    assert bf16.size == fp8.size == (128, 128)
    a, b = np.asarray(bf16.convert("RGB")), np.asarray(fp8.convert("RGB"))
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    assert s["psnr_db"] == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-5)
    side = Image.open(out / "images.png").convert("RGB")
    k = audit.panel_scale(128, 128)
    assert k == 2 and side.size == (3 * 256 + 4 * audit.PAD, 256 + 2 * audit.PAD + audit.CAPTION_H)
    p = audit.PAD
    panel = lambda i: np.asarray(side.crop((p + i * (256 + p), p, p + i * (256 + p) + 256, p + 256)))
    assert np.array_equal(panel(0), np.asarray(bf16.convert("RGB").resize((256, 256), Image.NEAREST)))
    assert np.array_equal(panel(1), np.asarray(fp8.convert("RGB").resize((256, 256), Image.NEAREST)))
    assert panel(2).max() > 0  # the amplified difference is not black
    assert Image.open(out / "heatmap.png").size == audit.heatmap_size(3, 12)  # 3 blocks; 7 image + 5 text columns
    assert Image.open(out / "error_vs_step.png").size == audit.PLOT_SIZE
    assert Image.open(out / "compare.png").size == audit.side_by_side_size(128, 128, n=5)


def test_csv_equals_hand_computation(run):
    """Rerun the FP8 model the way `generate --fp8 default` loads it, capture LAYER's input and output at the first
    step, and recompute the audit's numbers for that layer by hand."""
    root, s = run["root"], run["summary"]
    kw = dict(seed=3, steps=4, height=128, width=128)
    captured = {}

    def grab(key):
        return lambda mod, inp, out: captured.setdefault(key, (inp[0].clone(), out.clone())) and None

    pipe8 = load_pipeline(root, fp8="default", device="cpu")
    layer8 = pipe8.mmdit.get_submodule(LAYER)
    layer8.register_forward_hook(grab("fp8"))
    *_, last8 = pipe8.steps("a green sphere", **kw)
    pipe = load_pipeline(root, device="cpu")
    pipe.mmdit.get_submodule(LAYER).register_forward_hook(grab("bf16"))
    *_, last = pipe.steps("a green sphere", **kw)
    assert rel_rms(last8.latents, last.latents) == pytest.approx(s["latent_rel_rms"], rel=1e-5)

    row = next(r for r in read_csv(run["out"] / "layers.csv") if r["layer"] == LAYER)
    step0 = next(r for r in read_csv(run["out"] / "layer_steps.csv") if r["layer"] == LAYER and r["step"] == "0")
    # weight: the loader quantised the file's fp32 weight
    w32 = load_mmdit(root, dtype=torch.float32).get_submodule(LAYER).weight
    deq = layer8.weight.float() * layer8.weight_scale[:, None]
    assert float(row["w_rel_rms"]) == pytest.approx(rel_rms(deq, w32), rel=1e-4)
    assert float(row["w_amax"]) == pytest.approx(float(w32.abs().max()), rel=1e-5)
    # activation at step 0: the CFG batch [negative, prompt] entering the layer; one scale per token
    x, y8 = captured["fp8"]
    assert float(step0["act_amax"]) == pytest.approx(float(x.float().abs().max()), rel=1e-5)
    assert float(step0["act_scale_max"]) == pytest.approx(float(x.float().abs().amax(-1).max()) / 448, rel=1e-5)
    # isolated: the same input through the bf16 layer; propagated: the bf16 run's own output of the layer
    lin = pipe.mmdit.get_submodule(LAYER)
    iso = rel_rms(y8, F.linear(x, lin.weight, lin.bias))
    assert float(step0["iso_rel_rms"]) == pytest.approx(iso, rel=1e-4)
    assert float(step0["prop_rel_rms"]) == pytest.approx(rel_rms(y8, captured["bf16"][1]), rel=1e-4)
    assert 0.01 < iso < 0.1  # E4M3 on weight and activation: a few percent


def test_suggested_policy_reaches_its_target(run):
    sug = run["summary"]["suggested_policy"]
    assert sug["target"] < run["summary"]["latent_rel_rms"]  # default target: half the policy's error
    assert sug["verified_error"] <= sug["target"] and sug["units"]  # it had to keep something in bf16
    policy_file = Path(sug["file"])
    assert json.loads(policy_file.read_text())["rules"][: len(sug["units"])] == [
        [f"joint_blocks.*.{u.split('.', 1)[0]}_block.{u.split('.', 1)[1]}", "bf16"] for u in sug["units"]]
    kw = dict(seed=3, steps=4, height=128, width=128)
    *_, ref = load_pipeline(run["root"], device="cpu").steps("a green sphere", **kw)
    pipe8 = load_pipeline(run["root"], fp8=str(policy_file), device="cpu")
    *_, got = pipe8.steps("a green sphere", **kw)
    err = rel_rms(got.latents, ref.latents)
    assert err <= sug["target"]
    assert err == pytest.approx(sug["verified_error"], rel=1e-4)
    kept = {n for n, m in pipe8.mmdit.named_modules() if isinstance(m, torch.nn.Linear) and "joint_blocks" in n}
    assert len(kept) >= 1 and not any(isinstance(pipe8.mmdit.get_submodule(n), FP8Linear) for n in kept)


def test_policies_side_by_side(run):
    s = run["summary"]
    assert [c["policy"] for c in s["compare"]] == COMPARE
    rows = read_csv(run["out"] / "compare.csv")
    assert len(rows) == 29
    qkv = next(r for r in rows if r["layer"] == "joint_blocks.0.x_block.attn.qkv")
    assert [qkv[f"{p}:recipe"] for p in COMPARE] == ["w8a8-row", "w8a8-row", "w8a8-tensor", "w8-only"]
    # quantising the activation too adds its own ~2.6% on top of the weight's: for every block GEMM, weight-only
    # has the smaller isolated error
    gemms = [r for r in rows if r["row:recipe"] == "w8a8-row" and r["type"] != "adaLN_modulation.1"]
    assert len(gemms) == 23
    assert all(float(r["weight-only:iso_rel_rms"]) < float(r["row:iso_rel_rms"]) for r in gemms)
    report = (run["out"] / "report.txt").read_text()
    assert all(f"\n{p:<14}" in report for p in COMPARE)


def test_existing_output_is_not_overwritten(run, capsys):
    before = (run["out"] / "layers.csv").read_bytes()
    rc = cli_main(["audit", "--model", "tiny", "--out", str(run["out"])])
    assert rc == 1 and "--force" in capsys.readouterr().err
    assert (run["out"] / "layers.csv").read_bytes() == before


def test_weight_outliers_e4m3_vs_int8_intuition():
    """One output row s times larger. The whole-tensor error stays ~2.6% whatever s is (the big row dominates the
    norm); the other rows are hurt only when s pushes them into E4M3's subnormals (s >~ 448 / 2^-6)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    stats = {}
    for s in (1e2, 1e5):
        ws = w.clone()
        ws[3] *= s
        for per_channel in (False, True):
            stats[s, per_channel] = audit.weight_stats(ws, *quantize_weight(ws, per_channel))
    assert stats[1e2, False]["w_chan_rel_rms_max"] < 1.1 * stats[1e2, True]["w_chan_rel_rms_max"]
    assert stats[1e5, False]["w_chan_rel_rms_max"] > 5 * stats[1e5, True]["w_chan_rel_rms_max"]
    assert stats[1e5, False]["w_rel_rms"] < 1.2 * stats[1e5, True]["w_rel_rms"]  # the tensor-wide number hides it
    lost = stats[1e5, False]["w_subnormal"] + stats[1e5, False]["w_flushed"]  # the other 63 rows: all of them
    assert lost > 0.9 and stats[1e5, True]["w_subnormal"] + stats[1e5, True]["w_flushed"] < 0.05


def test_outlier_layer_is_found_under_tensor_scaling_and_cleared_by_row(run):
    pipe = load_pipeline(run["root"], device="cpu")
    inp = audit.prepare_inputs(pipe, "a green sphere", "", 3, 2, 64, 64, 4.0)
    model, D = pipe.mmdit, pipe.mmdit.cfg.hidden
    fc2, ada = model.get_submodule(LAYER), model.get_submodule("joint_blocks.1.x_block.adaLN_modulation.1")
    j, gate_mlp = 5, 5  # the x stream's modulation chunks: shift, scale, gate (attn), shift, scale, gate (mlp)
    w0 = fc2.weight.clone(), fc2.bias.clone(), ada.weight.clone(), ada.bias.clone()
    result = {}
    for s in (1e2, 1e5):
        with torch.no_grad():
            for t, t0 in zip((fc2.weight, fc2.bias, ada.weight, ada.bias), w0):
                t.copy_(t0)
            fc2.weight[j] *= s
            fc2.bias[j] *= s
            ada.weight[gate_mlp * D + j] /= s
            ada.bias[gate_mlp * D + j] /= s
        for policy in ("tensor", "row"):
            quantize(model, policy, keep_original=True)
            if (s, policy) == (1e5, "tensor"):  # the full ranking, every layer alone in FP8
                ranked = audit.sensitivity(pipe, inp, "layer", per_batch=32)
                mine = next(r for r in ranked if r["unit"] == LAYER)
                worst_other = max(r["final_rel_rms"] for r in ranked if r["unit"] != LAYER)
                result[s, policy] = mine["final_rel_rms"]
            else:  # only this layer in FP8
                result[s, policy] = audit.run_errors(model, inp, [frozenset({LAYER})], per_batch=2)[0]
            audit.restore_bf16(model)
    assert mine["rank"] == 1 and result[1e5, "tensor"] > 2 * worst_other
    assert result[1e5, "row"] < result[1e5, "tensor"] / 3 and result[1e5, "row"] < worst_other
    assert result[1e2, "tensor"] < 1.25 * result[1e2, "row"]  # E4M3: a 100x row costs per-tensor scaling nothing
