"""Streamed mode on a GPU: SD3.5 Large (random weights, FP8 default policy), 1024x1024, CFG batch 2. One step with
the whole MMDiT resident (fused forward, CUDA graph) against the same model with its joint blocks streamed from
pinned CPU memory (minisd35.fast.stream), ahead = 1 and 2: ms/step (median of 10 after 2 warm-ups), peak GPU
memory of the step, the memory the resident part holds, and the relative RMS difference of the outputs.

    python bench/streamed_gpu.py --out $OUT/streamed.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from minisd35 import fp8  # noqa: E402
from minisd35.bench import cuda_times as timed  # noqa: E402
from minisd35.bench import env_info, random_mmdit, rel_rms, step_inputs  # noqa: E402
from minisd35.config import get_preset  # noqa: E402
from minisd35.fast import accelerate, stream  # noqa: E402

GIB = 2**30


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="sd3.5-large")
    ap.add_argument("--px", type=int, default=1024)
    ap.add_argument("--policy", default="default")
    ap.add_argument("--out", default="streamed.json")
    args = ap.parse_args()
    res = {"env": env_info(), "variant": args.variant, "px": args.px, "batch": 2, "policy": args.policy, "runs": []}
    cfg = get_preset(args.variant).mmdit
    model = random_mmdit(cfg)
    fp8.quantize(model, args.policy)
    inputs = step_inputs(cfg, args.px, 2)
    dev = torch.device("cuda")

    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() / GIB
    fast = accelerate(model)
    ms = timed(lambda f=fast: f(*inputs))
    ref = fast(*inputs).float()
    rec = {"mode": "resident (fused, CUDA graph)", "ms": statistics.median(ms), "ms_all": ms,
           "weights_gib": weights, "peak_gib": torch.cuda.max_memory_allocated() / GIB}
    res["runs"].append(rec)
    print(rec["mode"], f"{rec['ms']:.1f} ms/step, weights {weights:.2f} GiB, peak {rec['peak_gib']:.2f} GiB",
          flush=True)
    # two more references on the same weights: the fused forward without the batched adaLN GEMV (what the streamed
    # forward runs, block by block), and the plain model (mmdit.py with FP8Linear): their differences to the resident
    # run are the yardstick for the streamed run's
    unfused = accelerate(model, graphs=False, fuse_adaln=False)(*inputs).float()
    plain = model(*inputs).float()
    res["resident_vs_unfused"], res["resident_vs_plain"] = rel_rms(ref, unfused), rel_rms(ref, plain)
    print(f"resident vs unfused adaLN {res['resident_vs_unfused']:.2e}, vs plain {res['resident_vs_plain']:.2e}")
    fast = None  # frees the CUDA graphs and the fused adaLN buffer
    gc.collect()
    torch.cuda.empty_cache()

    s = stream(model, dev, ahead=1)  # the blocks move to pinned CPU memory; the rest stays on the GPU
    for ahead in (1, 2):
        s.streamer.ahead = ahead
        s.streamer.max_resident = 0
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / GIB
        ms = timed(lambda f=s: f(*inputs))
        out = s(*inputs).float()
        rec = {"mode": f"streamed, ahead {ahead}", "ms": statistics.median(ms), "ms_all": ms,
               "resident_gib": resident, "peak_gib": torch.cuda.max_memory_allocated() / GIB,
               "max_blocks_on_gpu": s.streamer.max_resident, "pinned": all(p.pinned for p in s.streamer.parked),
               "rel_rms_vs_resident": rel_rms(out, ref), "rel_rms_vs_unfused": rel_rms(out, unfused),
               "rel_rms_vs_plain": rel_rms(out, plain)}
        rec["vs_resident"] = rec["ms"] / res["runs"][0]["ms"]
        res["runs"].append(rec)
        print(rec["mode"], f"{rec['ms']:.1f} ms/step ({rec['vs_resident']:.2f}x resident), resident part "
              f"{resident:.2f} GiB, peak {rec['peak_gib']:.2f} GiB, blocks on GPU <= {rec['max_blocks_on_gpu']}, "
              f"err vs resident {rec['rel_rms_vs_resident']:.2e}, vs unfused {rec['rel_rms_vs_unfused']:.2e}, vs plain "
              f"{rec['rel_rms_vs_plain']:.2e}", flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
