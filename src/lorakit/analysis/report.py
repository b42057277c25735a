"""`analyze`: the spectrum of every module's ΔW, φ against another adapter, the amplification against
the base, a suggested `rank_pattern`; as a dict, a JSON file, a table and plots."""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit import atomic
from lorakit.analysis.factors import ModuleFactors, delta_svd, effective_rank, read_factors
from lorakit.analysis.measures import amplification, right_singular_vectors, subspace_similarity
from lorakit.errors import ConfigError
from lorakit.models import adapter_directory, load_model, recorded_base
from lorakit.quantized import dequantized_weight

__all__ = ["Analysis", "analyze", "summary_table", "write_analysis"]

ENERGIES = (0.9, 0.99)


@dataclass
class Analysis:
    """What `lorakit analyze` does.

    Args:
        adapter: the adapter directory (PEFT format), or a training run's output directory; required.
        compare: a second adapter (another rank or seed of the same model) for the subspace
            similarity φ between the two adapters' A matrices, module by module.
        base: the base model (a packaged alias, a directory or a `.gguf` file) for the
            amplification factor; `auto` reads the one the adapter records.
        energy: the fraction of ΔW's energy (Σσ²) the suggested `rank_pattern` keeps.
        out: directory for `analysis.json` and the plots (created); omit to print only.
    """

    adapter: str | None = None
    compare: str | None = None
    base: str | None = None
    energy: float = 0.99
    out: str | None = None


def analyze(
    adapter: str | os.PathLike[str],
    *,
    compare: str | os.PathLike[str] | None = None,
    base: nn.Module | str | None = None,
    energy: float = 0.99,
) -> dict[str, Any]:
    """Analyse an adapter's updates, module by module.

    Args:
        adapter: adapter directory (or a run directory holding `adapter/`).
        compare: a second adapter directory for φ.
        base: the base model (its weights W) for the amplification factor: a model, or what
            `lorakit.models.load_model` loads (`auto`: the one the adapter records), loaded once
            both adapters are read, so a bad adapter is refused before a model loads.
        energy: for `suggested_rank_pattern`.

    Returns:
        `{"adapter": ..., "modules": {path: {"rank", "scaling", "singular_values",
        "effective_rank": {"0.9", "0.99"}, "frobenius", ["phi", "phi_delta", "compare_rank"],
        ["amplification"]}}, "layer_types": {...}, "suggested_rank_pattern": {...}, "energy": ...}`.

    Raises:
        ConfigError: `energy` outside (0, 1]; no module in common with `compare`; a base without a
            module the adapter adapts.
        AdapterFormatError: unreadable adapter files.
        ModelLoadError: a base that cannot be loaded.
    """
    if not 0.0 < energy <= 1.0:
        raise ConfigError(f"energy must be in (0, 1], got {energy}")
    folder = adapter_directory(adapter)
    config, modules = read_factors(folder)
    other: dict[str, ModuleFactors] = {}
    if compare is not None:
        _, found = read_factors(adapter_directory(compare))
        other = {m.path: m for m in found}
        if not set(other) & {m.path for m in modules}:
            raise ConfigError(f"{compare} adapts none of the modules {folder} adapts; nothing to compare")
    if isinstance(base, str):
        base, _, _ = load_model(recorded_base(folder) if base == "auto" else base)
    result: dict[str, Any] = {"adapter": str(folder), "energy": energy, "modules": {}}
    if compare is not None:
        result["compare"] = str(adapter_directory(compare))
    suggested: dict[str, int] = {}
    for factors in modules:
        svd = delta_svd(factors)
        entry: dict[str, Any] = {
            "rank": factors.rank,
            "scaling": factors.scaling,
            "kind": factors.kind,
            "singular_values": svd.S.tolist(),
            "effective_rank": {str(e): effective_rank(svd.S, e) for e in ENERGIES},
            "frobenius": svd.frobenius,
        }
        if factors.variant is not None:
            entry["variant"] = factors.variant  # the spectrum is of s·B·A alone (DoRA: its direction update)
        suggested[factors.path] = max(1, effective_rank(svd.S, energy))
        twin = other.get(factors.path)
        if twin is not None and twin.A.shape[1] == factors.A.shape[1]:
            entry["compare_rank"] = twin.rank
            entry["phi"] = subspace_similarity(
                right_singular_vectors(factors.A), right_singular_vectors(twin.A)
            ).tolist()
            entry["phi_delta"] = subspace_similarity(svd.V, delta_svd(twin).V).tolist()
        if base is not None:
            entry["amplification"] = amplification(_weight_for(base, factors), svd)
        result["modules"][factors.path] = entry
    result["suggested_rank_pattern"] = suggested
    result["layer_types"] = _by_layer_type(result["modules"])
    result["lora_alpha"] = config.lora_alpha
    return result


def _weight_for(base: nn.Module, factors: ModuleFactors) -> torch.Tensor:
    try:
        module = base.get_submodule(factors.path)
    except AttributeError:
        raise ConfigError(f"the base model has no module {factors.path}; is it the adapter's base?") from None
    module = getattr(module, "base_layer", module)  # a base that carries adapters itself
    weight = dequantized_weight(module.weight.detach()).double().cpu()
    weight = weight.reshape(weight.shape[0], -1)
    d, k = factors.B.shape[0], factors.A.shape[1]
    if weight.shape == (d, k):
        return weight
    if weight.shape == (k, d):  # an embedding table or a Conv1D: stored the other way round
        return weight.T
    raise ConfigError(f"{factors.path}: the base weight is {list(weight.shape)}, ΔW is {[d, k]}")


def _by_layer_type(modules: dict[str, Any]) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path, entry in modules.items():
        groups[path.rsplit(".", 1)[-1]].append(entry)
    out = {}
    for leaf, entries in groups.items():
        summary: dict[str, Any] = {
            "modules": len(entries),
            "ranks": sorted({e["rank"] for e in entries}),
            "mean_effective_rank": {
                str(e): statistics.fmean(x["effective_rank"][str(e)] for x in entries) for e in ENERGIES
            },
            "mean_frobenius": statistics.fmean(x["frobenius"] for x in entries),
            "mean_top_share": statistics.fmean(
                (x["singular_values"][0] ** 2 / sum(s * s for s in x["singular_values"]))
                if any(x["singular_values"])
                else 0.0
                for x in entries
            ),
        }
        with_phi = [x for x in entries if "phi" in x]
        if with_phi:
            summary["mean_phi_1_1"] = statistics.fmean(x["phi"][0][0] for x in with_phi)
            summary["mean_phi_diag"] = statistics.fmean(
                statistics.fmean(x["phi"][i][i] for i in range(min(len(x["phi"]), len(x["phi"][0])))) for x in with_phi
            )
        with_amp = [x["amplification"] for x in entries if x.get("amplification", {}).get("factor")]
        if with_amp:
            summary["mean_amplification"] = statistics.fmean(a["factor"] for a in with_amp)
            summary["mean_w_on_delta"] = statistics.fmean(a["w_on_delta"] for a in with_amp)
            summary["mean_w_on_w"] = statistics.fmean(a["w_on_w"] for a in with_amp)
            summary["mean_w_on_random"] = statistics.fmean(a["w_on_random"] for a in with_amp)
        out[leaf] = summary
    return out


def summary_table(result: dict[str, Any]) -> str:
    """A markdown table per layer type: modules, ranks, effective ranks, ‖ΔW‖, φ, amplification."""
    headers = ["layer type", "modules", "r", "eff. rank 90%", "eff. rank 99%", "top σ² share", "mean ‖ΔW‖_F"]
    types = result["layer_types"]
    any_phi = any("mean_phi_1_1" in s for s in types.values())
    any_amp = any("mean_amplification" in s for s in types.values())
    if any_phi:
        headers += ["φ(1,1)", "mean φ(i,i)"]
    if any_amp:
        headers += ["‖UᵀWV‖ (ΔW dirs)", "(W's top-r)", "(random)", "amplification"]
    lines = ["| " + " | ".join(headers) + " |", "| --- |" + " ---: |" * (len(headers) - 1)]
    for leaf, s in types.items():
        row = [
            leaf,
            str(s["modules"]),
            ",".join(map(str, s["ranks"])),
            f"{s['mean_effective_rank']['0.9']:.1f}",
            f"{s['mean_effective_rank']['0.99']:.1f}",
            f"{s['mean_top_share']:.2f}",
            f"{s['mean_frobenius']:.4g}",
        ]
        if any_phi:
            row += [f"{s.get('mean_phi_1_1', float('nan')):.2f}", f"{s.get('mean_phi_diag', float('nan')):.2f}"]
        if any_amp:
            row += [
                f"{s.get('mean_w_on_delta', float('nan')):.3g}",
                f"{s.get('mean_w_on_w', float('nan')):.3g}",
                f"{s.get('mean_w_on_random', float('nan')):.3g}",
                f"{s.get('mean_amplification', float('nan')):.1f}",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_analysis(result: dict[str, Any], out: str | os.PathLike[str]) -> list[Path]:
    """Write `analysis.json` and the plots (`spectrum.png`, and `phi_<layer type>.png` with a
    comparison) into `out` (created if missing), each file atomically. Returns the files written.

    Raises:
        ConfigError: `out` is not a folder, or cannot be one (`lorakit.atomic.check_target`, which
            `lorakit analyze` calls before it reads anything). Nothing is written then.
    """
    folder = atomic.check_target(out, directory=True)
    folder.mkdir(parents=True, exist_ok=True)
    written = [atomic.write_json(folder / "analysis.json", result, indent=1)]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plots need the `cli` extra; the numbers are in the JSON
        return written
    groups: dict[str, list[list[float]]] = defaultdict(list)
    for path, entry in result["modules"].items():
        groups[path.rsplit(".", 1)[-1]].append(entry["singular_values"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for leaf, spectra in groups.items():
        width = max(len(s) for s in spectra)
        normalised = torch.zeros(len(spectra), width, dtype=torch.float64)
        for row, s in enumerate(spectra):
            values = torch.tensor(s, dtype=torch.float64)
            normalised[row, : len(s)] = values / values.max() if values.max() > 0 else values
        ax.plot(range(1, width + 1), normalised.mean(0).tolist(), marker="o", label=leaf)
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / σ_1 of ΔW (mean over layers)")
    ax.set_title("Spectrum of ΔW = s·B·A")
    ax.legend()
    fig.tight_layout()
    written.append(_save_figure(fig, folder / "spectrum.png"))
    plt.close(fig)
    phis: dict[str, list[torch.Tensor]] = defaultdict(list)
    for path, entry in result["modules"].items():
        if "phi" in entry:
            phis[path.rsplit(".", 1)[-1]].append(torch.tensor(entry["phi"]))
    for leaf, mats in phis.items():
        shapes = {tuple(m.shape) for m in mats}
        if len(shapes) != 1:
            continue
        mean = torch.stack(mats).mean(0)
        fig, ax = plt.subplots(figsize=(5, 4))
        rows, cols = mean.shape
        extent = (0.5, cols + 0.5, rows + 0.5, 0.5)  # cells centred on i, j = 1, 2, ...
        image = ax.imshow(mean.numpy(), vmin=0, vmax=1, cmap="viridis", extent=extent, aspect="auto")
        ax.set_xticks(range(1, cols + 1, max(1, cols // 8)))
        ax.set_yticks(range(1, rows + 1, max(1, rows // 8)))
        ax.set_xlabel("j (compared adapter)")
        ax.set_ylabel("i (this adapter)")
        ax.set_title(f"φ(A, A', i, j) for {leaf}, mean over {len(mats)} layers")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        written.append(_save_figure(fig, folder / f"phi_{leaf}.png"))
        plt.close(fig)
    return written


def _save_figure(fig: Any, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return atomic.write_bytes(path, buffer.getvalue())
