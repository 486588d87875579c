"""`longside bench train`: the cost of one training step, side tuning against the usual ways.

Methods, each measured in a fresh process so peak memory is its own:
  longside  the side network on a frozen backbone (4-bit NF4 when the kernels are built),
            memory on, no gradient through the backbone
  longside-replay  the same, the backbone's features read back from a FeatureCache on
            disk (filled by the warm-up step): what a further epoch over the same segments
            costs
  qlora     PEFT LoRA r=16 on every linear layer of a bitsandbytes NF4 backbone
  lora      PEFT LoRA r=16 on the dense fp32 backbone
  full      every parameter, fp32
Peak memory is the process's peak resident set size (`ru_maxrss`), the same for all;
step time is the median of the timed steps after one warm-up step. AdamW everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from longside.backbone import load_backbone
from longside.config import SideNetConfig
from longside.data import load_books
from longside.model import LongSideModel
from longside.paths import check_output_file, write_json
from longside.provenance import RunRecord
from longside.training.feature_cache import FeatureCache

METHODS = ("longside", "longside-replay", "qlora", "lora", "full")


def _batch(tokenizer, seq: int, batch: int):
    text = "\n".join(c["text"] for c in load_books("validation")[0]["chapters"])
    ids = np.asarray(tokenizer(text).input_ids[: seq * batch * 2], dtype=np.int64)
    return torch.from_numpy(ids[: seq * batch]).view(batch, seq), torch.from_numpy(ids[seq * batch:]).view(batch, seq)


def _worker(method: str, seq: int, batch: int, steps: int) -> dict:
    torch.manual_seed(0)

    if method in ("longside", "longside-replay"):
        bb = load_backbone("smollm2-135m", quantize="nf4")
        model = LongSideModel(bb, SideNetConfig(window=max(seq, 1024)))
        params = model.trainable_parameters()
        note = "backbone nf4 (longside kernels)"
        if method == "longside-replay":
            cache_dir = tempfile.mkdtemp(prefix="longside-features-")
            model.feature_cache = FeatureCache(cache_dir, bb, model.feature_layers(), model.config.memory_layer)
            note += f", features replayed from {cache_dir} (bfloat16)"

        def step(ids):  # reads memory, never writes: every step sees the same memory
            return model(ids, labels=ids, write_memory=False, return_logits=False).loss
        first, second = _batch(bb.tokenizer, seq, batch)
        model(first)  # memory holds one segment per row, so retrieval is part of the step
        data = second
    else:
        # imported here, not at the top: each method runs in its own process and its peak
        # memory is measured, so longside's process must not load PEFT or bitsandbytes
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bb = load_backbone("smollm2-135m")
        src = bb.model.name_or_path
        tok = bb.tokenizer
        del bb
        if method == "qlora":
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
            model = AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        note = ""
        if method in ("qlora", "lora"):
            lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
            model = get_peft_model(model, lora)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]

        def step(ids):
            return model(input_ids=ids, labels=ids).loss
        data = _batch(tok, seq, batch)[1]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = step(data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    row = {"method": method, "seq_len": seq, "batch": batch, "step_s": statistics.median(times),
           "step_s_each": [round(t, 3) for t in times],
           "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "trainable_params": sum(p.numel() for p in params), "loss": float(loss.detach()), "note": note}
    if method == "longside-replay":
        row["feature_cache"] = model.feature_cache.stats()
        shutil.rmtree(model.feature_cache.path, ignore_errors=True)
    return row


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="longside bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="sequence 128, batch 1, 1 timed step")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seq", default="512,1024")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per method")
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "SEQ", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_output_file(args.json, "--json")
    run = RunRecord.start(["longside", "bench", "train", *argv])
    if args.worker:
        m, s, b = args.worker
        print(json.dumps(_worker(m, int(s), int(b), args.steps)))
        return 0
    seqs = [128] if args.quick else [int(s) for s in args.seq.split(",")]
    batch, steps = (1, 1) if args.quick else (args.batch, args.steps)
    results = []
    for seq in seqs:
        for method in args.methods.split(","):
            if method not in METHODS:
                print(f"unknown method {method!r}; choose from {', '.join(METHODS)}", file=sys.stderr)
                return 2
            cmd = [sys.executable, "-m", "longside", "bench", "train", "--steps", str(steps),
                   "--worker", method, str(seq), str(batch)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode:
                row = {"method": method, "seq_len": seq, "batch": batch, "error": proc.stderr.strip().splitlines()[-1:]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(row)
            print(json.dumps(row), flush=True)
    report = {"benchmark": "train", "quick": args.quick, "results": results, "ratios": _ratios(results),
              "provenance": run.finish(timed_steps=steps)}
    text = json.dumps(report, indent=2)
    if args.json:
        write_json(report, args.json, indent=2)
    print(text)
    return 0


def _ratios(results: list[dict]) -> list[dict]:
    """longside against QLoRA at each sequence length: memory and step-time ratios."""
    out = []
    for seq in sorted({r["seq_len"] for r in results}):
        by = {r["method"]: r for r in results if r["seq_len"] == seq and "error" not in r}
        row = {}
        if "longside" in by and "qlora" in by:
            row.update(qlora_over_longside_mem=by["qlora"]["peak_mem_mb"] / by["longside"]["peak_mem_mb"],
                       qlora_over_longside_step=by["qlora"]["step_s"] / by["longside"]["step_s"])
        if "longside" in by and "longside-replay" in by:
            row.update(longside_over_replay_step=by["longside"]["step_s"] / by["longside-replay"]["step_s"])
        if row:
            out.append({"seq_len": seq, **row})
    return out
