"""MAE and ConvMAE pre-training throughput (img/s) and peak memory: encoder (ConvMAE: its stage 3) on the
visible 25% vs on all tokens.

``make bench`` runs every case in its own process (so peak RSS is that case's own) on the CPU, and
on the GPU too when one is present. One step = forward, backward and an AdamW update.

    python benchmarks/mae_throughput.py                 # all cases, table on stdout
    python benchmarks/mae_throughput.py --case vit_tiny_32 --mode masked --device cpu
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from mimzoo.methods import MAE, ConvMAE

CASES = {  # name: (method, encoder, decoder, image size, batch on CPU, batch on GPU)
    "vit_tiny_32": (
        MAE,
        dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3),
        dict(dim=256, depth=4, num_heads=8),
        32,
        128,
        1024,
    ),
    "vit_small_224": (
        MAE,
        dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
        dict(dim=512, depth=8, num_heads=16),
        224,
        8,
        256,
    ),
    # ConvMAE-CIFAR (src/mimzoo/conf/model/convmae_encoder/cifar.yaml) with experiment=convmae_cifar's decoder
    "convmae_cifar_32": (
        ConvMAE,
        dict(img_size=32, patch_size=[1, 2, 2], embed_dim=[64, 128, 256], depth=[2, 2, 8], num_heads=4),
        dict(dim=256, depth=4, num_heads=8),
        32,
        128,
        1024,
    ),
}


MODES = ("masked", "all_tokens", "encoder_masked", "encoder_all_tokens")


def step_fn(model: MAE, mode: str):  # ConvMAE too: same encode/encoder.forward_masked/decoder/loss API
    """``masked``: MAE proper; ``all_tokens``: the same loss, but the encoder runs on every token;
    ``encoder_*``: the encoder alone (forward + backward of its output), to isolate token dropping."""
    if mode == "masked":
        return lambda x: model(x).loss
    if mode == "encoder_masked":
        return lambda x: model.encode(x, model.draw_mask(x.shape[0])).float().square().mean()
    if mode == "encoder_all_tokens":
        return lambda x: model.encode(x).float().square().mean()
    if mode != "all_tokens":
        raise ValueError(mode)

    def full(x):
        mask = model.draw_mask(x.shape[0])
        pred = model.decoder(model.encoder.forward_masked(x), torch.zeros_like(mask))  # every token visible
        return model.loss(x, pred, mask)

    return full


def run_case(case: str, mode: str, device: str, steps: int, warmup: int) -> dict:
    method, enc, dec, size, cpu_batch, gpu_batch = CASES[case]
    batch = gpu_batch if device == "cuda" else cpu_batch
    torch.manual_seed(0)
    model = method(encoder=enc, decoder=dec).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    x = torch.randn(batch, 3, size, size, device=device)
    loss_fn = step_fn(model, mode)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return dict(
        case=case,
        mode=mode,
        device=device,
        batch=batch,
        precision="bf16" if device == "cuda" else "fp32",
        img_per_s=batch * steps / seconds,
        peak_mib=peak / 2**20,
        device_name=torch.cuda.get_device_name() if device == "cuda" else f"CPU x{torch.get_num_threads()}",
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=sorted(CASES))
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on CPU, 30 on GPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    if args.case:  # one case, in this process
        steps = args.steps or (30 if args.device == "cuda" else 5)
        print(json.dumps(run_case(args.case, args.mode, args.device, steps, args.warmup)))
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for case in CASES:
            for mode in MODES:
                cmd = [
                    sys.executable,
                    __file__,
                    "--case",
                    case,
                    "--mode",
                    mode,
                    "--device",
                    device,
                    "--warmup",
                    str(args.warmup),
                ] + (["--steps", str(args.steps)] if args.steps else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                r = rows[-1]
                print(
                    f"  {device:4s} {case:14s} {mode:18s} {r['img_per_s']:9.1f} img/s  {r['peak_mib']:8.0f} MiB",
                    flush=True,
                )
    print(
        "\n| device | case | batch | precision | step, mask 0.75 | step, all tokens | speed-up "
        "| encoder only, 0.75 / all tokens | encoder speed-up | peak MiB (0.75 / all) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for device in devices:
        for case in CASES:
            m, a, em, ea = (
                next(r for r in rows if (r["device"], r["case"], r["mode"]) == (device, case, mode)) for mode in MODES
            )
            print(
                f"| {m['device_name']} | {case} | {m['batch']} | {m['precision']} | {m['img_per_s']:.1f} img/s | "
                f"{a['img_per_s']:.1f} img/s | {m['img_per_s'] / a['img_per_s']:.2f}x | "
                f"{em['img_per_s']:.1f} / {ea['img_per_s']:.1f} img/s | {em['img_per_s'] / ea['img_per_s']:.2f}x | "
                f"{m['peak_mib']:.0f} / {a['peak_mib']:.0f} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
