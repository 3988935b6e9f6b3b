# SPDX-License-Identifier: Apache-2.0
"""Saving and resuming meta-training: ``GimliUpdater.state_dict`` / ``load_state_dict``.

A state dict holds φ, the meta optimizer's state, the counters and the options a resumed run
must share (the memory, kernel and progress options may differ: they do not change the
results). It is tensors and plain Python values only, so ``torch.load(..., weights_only=True)``
reads it. Loading is a transaction: a mismatch or a failure changes nothing.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import torch


def saved_options(updater: Any) -> dict[str, Any]:
    """The options two updaters must share for one's state to load into the other."""
    return {"optimizer": updater.impl.name, "learn": dict(updater.learn), "loss_params": sorted(updater.loss_params),
            **updater.options.saved()}


def state_dict(updater: Any) -> dict[str, Any]:
    """See :meth:`gimli_bptt.GimliUpdater.state_dict`."""
    return {
        "phi": {name: t.detach().clone() for name, t in updater.phi.named()},
        "meta_opt": copy.deepcopy(updater.meta_opt.state_dict()),
        "counters": {"meta_steps": updater.meta_steps, "skipped_steps": updater.skipped_steps},
        "options": {**saved_options(updater), "memory": dataclasses.asdict(updater.memory)},
        "hvp_fallback": updater._hvp_fallback,
    }


def load_state_dict(updater: Any, state: Mapping[str, Any]) -> None:
    """See :meth:`gimli_bptt.GimliUpdater.load_state_dict`."""
    for key in ("phi", "meta_opt", "counters", "options"):
        if key not in state:
            raise ValueError(f"not a GimliUpdater state_dict: missing {key!r}")
    saved, ours = state["options"], saved_options(updater)
    diffs = [f"{k}: saved {saved.get(k)!r}, here {ours[k]!r}" for k in ours if saved.get(k) != ours[k]]
    phi = dict(updater.phi.named())
    if set(state["phi"]) != set(phi):
        diffs.append(f"meta-parameters: saved {sorted(state['phi'])}, here {sorted(phi)}")
    else:
        diffs += [f"{n}: saved shape {tuple(v.shape)}, here {tuple(phi[n].shape)}"
                  for n, v in state["phi"].items() if v.shape != phi[n].shape]
    if diffs:
        raise ValueError("cannot load this state_dict into this updater: " + "; ".join(diffs))
    with updater._transaction():
        with torch.no_grad():
            for name, t in phi.items():
                t.copy_(state["phi"][name])
        updater.meta_opt.load_state_dict(state["meta_opt"])
        updater.hyper.write_back(updater.opt.param_groups)
    updater.meta_steps = int(state["counters"]["meta_steps"])
    updater.skipped_steps = int(state["counters"]["skipped_steps"])
    updater._hvp_fallback = bool(state.get("hvp_fallback", False))


__all__ = ["load_state_dict", "saved_options", "state_dict"]
