"""What every benchmark section shares: the model specs, their seeded checkpoints, the run context."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
WORK = BENCH_DIR / "work"  # checkpoints (gitignored), reused between runs


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = 32000


TINY = ModelSpec("tiny", hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=688)
LLAMA_270M = ModelSpec("llama-270m", hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=16,
                       intermediate_size=2816)


@dataclass
class Context:
    models: list[ModelSpec]  # smallest first; node memory is measured on the last
    repeats: dict[str, int]  # timed forward/backward repeats per model name, each after one warm-up
    gen_repeats: dict[str, int]  # timed generate() repeats per model name, each after one warm-up
    node_env: dict[str, str]  # OMP/MKL thread count for nodes and client processes (--threads); empty: torch's default
    quick: bool = False  # fewer repeats and shorter windows everywhere

    def seconds(self, full: float) -> float:
        """A measuring window: ``full`` seconds, a third of it with --quick."""
        return full / 3 if self.quick else full


def checkpoint(spec: ModelSpec) -> Path:
    """The seeded checkpoint for ``spec`` under bench/work/, built once and reused."""
    from tests.helpers.checkpoints import build_checkpoint

    dest, want = WORK / f"bench-{spec.name}", json.dumps(asdict(spec), sort_keys=True)
    if not ((dest / "bench-spec.json").is_file() and (dest / "bench-spec.json").read_text() == want):
        log(f"building checkpoint {dest}")
        fields = {k: v for k, v in asdict(spec).items() if k != "name"}
        build_checkpoint(dest, **fields, tokenizer=False, seed=0)
        (dest / "bench-spec.json").write_text(want)
    return dest


def checkpoint_mib(folder: Path, prefix: str = "") -> float:
    """Float32 size of the checkpoint's tensors whose names start with ``prefix``, from the headers."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            total += sum(4 * math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix))
    return total / 2**20
