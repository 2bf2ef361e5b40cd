"""What a benchmark asks for: request shapes and the random prompts that fill them.

Latency mode: B identical requests (I prompt tokens, exactly O new ones). Offline-throughput mode:
N requests with lengths drawn uniformly from ranges (seeded), or read from a JSON file. Shared-prefix
mode: N requests whose prompts start with the same P tokens (a system prompt, few-shot examples),
then I tokens of their own; the prefix was seen before they arrive. Prompts are
random token ids: speed does not depend on the text, and every request ignores EOS so it produces
exactly its output length.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Request:
    input_len: int
    output_len: int


@dataclass
class Workload:
    name: str  # e.g. "latency b=1 in=128 out=128"
    requests: list[Request]
    mode: str  # latency | throughput | shared-prefix
    prefix_len: int = 0  # leading prompt tokens every request shares (counted in input_len)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)


def latency(batch: int, input_len: int, output_len: int) -> Workload:
    if min(batch, input_len, output_len) < 1:
        raise ValueError("--batch, --input-len and --output-len must be >= 1")
    return Workload(f"latency b={batch} in={input_len} out={output_len}",
                    [Request(input_len, output_len)] * batch, "latency")


def shared_prefix(num_requests: int, prefix_len: int, input_len: int, output_len: int) -> Workload:
    if min(num_requests, prefix_len, input_len, output_len) < 1:
        raise ValueError("--num-requests, --shared-prefix, --input-len and --output-len must be >= 1")
    return Workload(f"shared-prefix n={num_requests} prefix={prefix_len} in={input_len} out={output_len}",
                    [Request(prefix_len + input_len, output_len)] * num_requests, "shared-prefix", prefix_len)


def parse_range(text: str) -> tuple[int, int]:
    """'a,b' (or a single 'a') -> (a, b) with 1 <= a <= b."""
    parts = [int(p) for p in text.split(",")]
    lo, hi = (parts[0], parts[0]) if len(parts) == 1 else parts
    if not 1 <= lo <= hi or len(parts) > 2:
        raise ValueError(f"bad length range '{text}': want a,b with 1 <= a <= b")
    return lo, hi


def random_lengths(num_requests: int, input_range: tuple[int, int], output_range: tuple[int, int],
                   seed: int = 0) -> Workload:
    if num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {num_requests}")
    rng = random.Random(seed)
    requests = [Request(rng.randint(*input_range), rng.randint(*output_range)) for _ in range(num_requests)]
    return Workload(f"throughput n={num_requests} in={input_range[0]}-{input_range[1]} "
                    f"out={output_range[0]}-{output_range[1]}", requests, "throughput")


def from_file(path: str | Path) -> Workload:
    """A JSON list of [input_len, output_len] pairs or {"input_len", "output_len"} objects."""
    want = f"{path}: want a non-empty JSON list of [input_len, output_len] pairs (or objects) of integers >= 1"
    try:
        items = json.loads(Path(path).read_text())
        requests = [Request(*item) if isinstance(item, list) else Request(item["input_len"], item["output_len"])
                    for item in items]
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{want} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not requests or not all(isinstance(n, int) and n >= 1 for r in requests for n in (r.input_len, r.output_len)):
        raise ValueError(want)
    return Workload(f"throughput file={Path(path).name} n={len(requests)}", requests, "throughput")


def random_prompts(workload: Workload, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab_size) for _ in range(workload.prefix_len)]
    return [prefix + [rng.randrange(vocab_size) for _ in range(r.input_len - len(prefix))] for r in workload.requests]
