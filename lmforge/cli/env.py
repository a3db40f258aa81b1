"""Show this machine (CPU model, ISA flags, cores, torch, device), what --precision auto means here,
and the kernels chosen for a model's shapes, and why (measured on first use, then cached).

  lmforge env                       # the machine, and MiniLM's kernel choices
  lmforge env --model runs/x/best --json
"""

from __future__ import annotations

import json


def add_parser(p) -> None:
    p.add_argument("--model", default="minilm", help="model whose shapes to show kernels for (default: minilm)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.add_argument("--recalibrate", action="store_true",
                   help="forget this machine's cached kernel choices and measure again (best on an idle machine); "
                        "retry a compiled-kernel build that failed before")


def _shapes(model) -> list[tuple[int, ...]]:
    """Weight shapes [in, out] of the model's Linear layers, [in, q, k, v] of its stacked Q/K/V,
    [heads, head size, dropout] of its attention and [heads, key/value heads, head size, causal] of its packed
    inference attention."""
    from torch import nn

    shapes = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)}
    for layer in model.transformer.layers:
        a = layer.attention
        shapes.add((a.query.in_features, a.query.out_features, a.key.out_features, a.value.out_features))
        shapes.update({(a.num_heads, a.head_dim, 0), (a.num_heads, a.head_dim, 1)})
        shapes.add((a.num_heads, a.num_kv_heads, a.head_dim, int(a.causal)))
    return sorted(shapes)


def _exercise(model, device, precision) -> None:
    """Run the model at inference and a training step on batch sizes of each size bucket, under the
    resolved precision, so that every kernel choice for its shapes is made (or read from the cache)."""
    import torch

    from lmforge.models.packing import Packed

    vocab = model.config.vocab_size
    attention = [layer.attention for layer in model.transformer.layers]
    dropout = [a.dropout_p for a in attention]
    for rows in (1, 16, 128, 1024):   # every size bucket (each is measured when first met)
        lengths = [min(rows, 64)] * max(1, rows // 64)
        ids = torch.randint(5, vocab, (sum(lengths),), device=device)
        packed = Packed.from_lengths(lengths, device)
        with precision.autocast(device):
            with torch.no_grad():
                model.eval()(ids, packed=packed)
            model.train()
            out = model(ids, packed=packed)
            out.hidden_states.float().sum().backward()
            # attention's kernel is chosen only where it has no dropout (pre-training, decoders):
            # once more without it, so that its choice is made and shown too
            try:
                for a in attention:
                    a.dropout_p = 0.0
                model(ids, packed=packed).hidden_states.float().sum().backward()
            finally:   # the model's own dropout back, whatever happened
                for a, p in zip(attention, dropout):
                    a.dropout_p = p
        model.zero_grad(set_to_none=True)


def run(args) -> int:
    import torch

    from lmforge.kernels import caches, compiled, machine, resolve_device, resolve_precision
    from lmforge.kernels.calibrate import CHOICES, cache_path, forced
    from lmforge.models import from_pretrained

    device = resolve_device(args.device)
    if args.recalibrate:
        CHOICES.forget()
        compiled.forget_failures()
    info = machine.info()
    auto = resolve_precision("auto", device)
    model = from_pretrained(args.model, head=None, device=device)
    chosen = {}
    for precision in {resolve_precision("fp32", device), auto}:
        _exercise(model, device, precision)
    wanted = ["x".join(map(str, s)) for s in _shapes(model)]
    for key, value in sorted(CHOICES.table().items()):
        if key.split("|")[3] in wanted:
            chosen[key] = value
    report = {"machine": info, "machine_key": machine.machine_key(), "device": str(device),
              "precision_auto": {"name": auto.name, "why": auto.why},
              "kernels_forced": forced() or None, "kernel_cache": str(cache_path()),
              "library_caches": caches.bound(), "compiled_kernels": compiled.status(),
              "model": args.model, "kernels": chosen}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"cpu        {info['cpu']} ({info['cores']} cores, torch uses {info['threads']} threads)")
    print(f"isa        {' '.join(info['flags']) or '(none of note)'}"
          + (f"  [capped by ONEDNN_MAX_CPU_ISA={info['isa_cap']}]" if info['isa_cap'] else ""))
    print(f"torch      {info['torch']} (oneDNN {'yes' if info['onednn'] else 'no'})")
    print(f"device     {device}" + (f" ({info['cuda']})" if info["cuda"] else ""))
    print(f"precision  auto = {auto.name} ({auto.why.removeprefix('auto: ')})")
    print(f"kernels    {'forced by LMFORGE_KERNELS: ' + json.dumps(forced()) if forced() else 'measured'}; "
          f"cache {cache_path()}")
    print("caches     " + ", ".join(f"{k}={v}" for k, v in report["library_caches"].items())
          + " (oneDNN's and ideep's per-shape caches, bounded by lmforge unless set)")
    print(f"compiled   {report['compiled_kernels']}")
    print(f"\nkernels chosen for {args.model} (op | compute dtype | mode | weight shape in x out | rows bucket;"
          " attention: heads x head size x dropout | keys bucket;"
          " packed_attention: heads x kv heads x head size x causal | longest sequence's bucket;"
          " add_norm: width x RMSNorm | rows bucket; rows_parallel: weight shape | the GEMM's row bucket):")
    width = max(map(len, chosen), default=0)
    for key, value in chosen.items():
        print(f"  {key:<{width}} {value['kernel']:<8} {value['why']}")
    del torch
    return 0
