"""Why a low rank suffices: the LoRA paper's analyses of a learned ΔW, as tools (`lorakit analyze`,
`lorakit compress`).

- `factors`: an adapter's A, B and scale from its PEFT files; ΔW's SVD from the r×r core.
- `measures`: the subspace similarity φ (Figure 3/4) and the amplification factor (Table 7).
- `report`: `analyze` (every module, per layer type, a suggested `rank_pattern`), its JSON and plots.
- `compress`: truncate ΔW per module by SVD (an energy fraction or a rank) into a smaller adapter.
"""

from lorakit.analysis.compress import Compression, compress
from lorakit.analysis.factors import ModuleFactors, delta_svd, effective_rank, read_factors
from lorakit.analysis.measures import amplification, right_singular_vectors, subspace_similarity
from lorakit.analysis.report import Analysis, analyze, summary_table, write_analysis

__all__ = [
    "Analysis",
    "Compression",
    "ModuleFactors",
    "amplification",
    "analyze",
    "compress",
    "delta_svd",
    "effective_rank",
    "read_factors",
    "right_singular_vectors",
    "subspace_similarity",
    "summary_table",
    "write_analysis",
]
