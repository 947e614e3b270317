"""A model's architecture as the quantize stage sees it, on the meta device (no weights): the Linear layers a
weight-only scheme quantizes (llm-compressor's matching rule), and the checks against them before any work: the
group size divides every quantized layer's input dimension, and the AWQ mappings exist for the family and
resolve to one smooth layer and its balance layers per decoder block."""
from __future__ import annotations

import re
from typing import Any

from .common import fail


def match_name(name: str, target: str, module=None) -> bool:
    """compressed-tensors' matching rule (also GPTQModel-free): 're:<regex>' is re.match on the module name,
    anything else is the exact name or, given the module, one of its class names."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or (module is not None and any(c.__name__ == target for c in type(module).__mro__))


def quantized_linears(model, ignore: list[str]) -> list[tuple[str, Any]]:
    """The Linear layers a weight-only scheme targets (llm-compressor semantics: class Linear, minus ignore)."""
    import torch

    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and not any(match_name(name, ign, mod) for ign in ignore)]


def _decoder_blocks(model) -> int:
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "num_layers", None)
    return int(n or 0)


def check_against_model(recipe: dict, model, where: str) -> dict:
    """Checks that need the architecture (a meta-device model): the group size divides every quantized
    layer's input dimension; AWQ mappings exist for the family and each resolves to one smooth layer and its
    balance layers per decoder block. Returns what the run uses (the AWQ mappings)."""
    info: dict[str, Any] = {"architecture": type(model).__name__}
    method = recipe["method"]
    if method not in ("gptq", "awq", "rtn"):
        return info
    layers = quantized_linears(model, recipe["ignore"])
    if not layers:
        raise fail(f"{where}: key ignore", f"no Linear layer of {info['architecture']} is left to quantize",
                   "ignore fewer modules")
    gs = recipe["group_size"]
    if gs != -1:
        bad = [(n, m.in_features) for n, m in layers if m.in_features % gs]
        if bad:
            name, cols = bad[0]
            divisors = [g for g in (32, 64, 128, 256) if all(m.in_features % g == 0 for _, m in layers)]
            raise fail(f"{where}: key group_size",
                       f"group size {gs} does not divide the input dimension of {len(bad)} layer(s) of "
                       f"{info['architecture']}, e.g. {name} ({cols} inputs)",
                       f"use a group size that divides every layer ({', '.join(map(str, divisors)) or 'none of 32..256'}),"
                       " -1 for per-channel scales, or add those layers to ignore")
    info["quantized_layers"] = len(layers)
    if method == "awq":
        info["awq_mappings"] = _awq_mappings(recipe, model, where)
    return info


def _awq_mappings(recipe: dict, model, where: str) -> list[dict]:
    """The recipe's AWQ mappings (smooth layer -> balance layers), or llm-compressor's registry entry for the
    architecture; either way each must match one smooth layer per decoder block. llm-compressor itself falls
    back to Llama-style names for an unknown architecture, which do not exist in e.g. OPT: refuse that here."""
    arch = type(model).__name__
    if "awq_mappings" in recipe:
        maps = [{"smooth": m["smooth"], "balance": list(m["balance"])} for m in recipe["awq_mappings"]]
        key = "awq_mappings"
    else:
        from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY

        if arch not in AWQ_MAPPING_REGISTRY:
            raise fail(f"{where}: key awq_mappings", f"model family {arch} has no AWQ mappings in llm-compressor "
                       "and the recipe gives none",
                       "write them out (smooth layer -> balance layers per decoder block, as in recipes/awq_opt67b.yaml)")
        maps = [{"smooth": m.smooth_layer, "balance": list(m.balance_layers)} for m in AWQ_MAPPING_REGISTRY[arch]]
        key = f"awq_mappings (llm-compressor's {arch} entry)"
    names = {n: m for n, m in model.named_modules() if n}
    blocks = _decoder_blocks(model)
    import torch

    for i, m in enumerate(maps):
        smooth = [n for n in names if match_name(n, m["smooth"])]
        if not smooth:
            raise fail(f"{where}: key {key}[{i}].smooth", f"{m['smooth']!r} matches no module of {arch}",
                       "write the mappings for this model family (print(model) shows the module names)")
        if blocks and len(smooth) != blocks:
            raise fail(f"{where}: key {key}[{i}].smooth",
                       f"{m['smooth']!r} matches {len(smooth)} modules of {arch}, not one per decoder block "
                       f"({blocks}), e.g. {', '.join(sorted(smooth)[:2])}",
                       r"anchor the regex to the block, e.g. 're:.*layers\.\d+\.final_layer_norm$'")
        for b in m["balance"]:
            bal = [n for n in names if match_name(n, b)]
            if not bal or not all(isinstance(names[n], torch.nn.Linear) for n in bal):
                raise fail(f"{where}: key {key}[{i}].balance", f"{b!r} matches no Linear layer of {arch}",
                           "name the Linear layers that read the smooth layer's output")
            if blocks and len(bal) != blocks:
                raise fail(f"{where}: key {key}[{i}].balance",
                           f"{b!r} matches {len(bal)} layers of {arch}, not one per decoder block ({blocks})",
                           r"anchor the regex to the block, e.g. 're:.*layers\.\d+\.fc1$'")
    return maps
