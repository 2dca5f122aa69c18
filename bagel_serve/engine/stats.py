"""What one `generate` call (or one stage's share of it) did, and how long each phase took."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunStats:
    """What one `generate` call did and how long each phase took (seconds are real only when timed).

    A packed forward that serves several phases at once counts in each of them.
    """

    requests: int = 0
    wall_s: float = 0.0
    forwards: int = 0
    graph_forwards: int = 0
    """Forwards replayed from a CUDA graph (decode or denoising)."""
    decoded_tokens: int = 0
    denoise_steps: int = 0
    denoise_branch_evals: int = 0
    images: int = 0
    phase_s: dict[str, float] = field(default_factory=dict)
    queue_s: float = 0.0
    """Summed time requests waited in a stage's queue before admission."""
    admitted: int = 0
    """Admissions (a request of a two-stage pipeline is admitted once per stage)."""
    kv_peak_blocks: int = 0
    kv_block_bytes: int = 0
    kv_total_blocks: int = 0
    shared_forwards: int = 0
    """Packed forwards that served more than one request (continuous batching at work)."""
    max_batch_requests: int = 0
    """The most requests one packed forward served."""

    def summary(self) -> str:
        if self.wall_s:
            lines = [f"{self.requests} request(s) in {self.wall_s:.2f} s, {self.forwards} packed forwards"]
        else:  # one stage's share of a run
            lines = [f"{self.admitted} request(s) admitted, {self.forwards} packed forwards"]
        if self.graph_forwards:
            lines[0] += f" ({self.graph_forwards} from CUDA graphs)"
        for phase, sec in self.phase_s.items():
            lines.append(f"  {phase:<16} {sec:8.3f} s")
        dec = self.phase_s.get("decode", 0.0) + self.phase_s.get("think_decode", 0.0)
        if self.decoded_tokens:
            lines.append(f"  decoded tokens {self.decoded_tokens}" + (f" ({self.decoded_tokens / dec:.1f} tok/s)" if dec else ""))
        if self.denoise_steps:
            den = self.phase_s.get("denoise", 0.0)
            lines.append(f"  denoising steps {self.denoise_steps} ({self.denoise_branch_evals} branch evaluations)"
                         + (f", {self.denoise_steps / den:.2f} steps/s" if den else ""))
        if self.images:
            lines.append(f"  images {self.images}" + (f" ({self.images / self.wall_s:.3f} images/s)" if self.wall_s else ""))
        if self.admitted:
            lines.append(f"  queue wait {self.queue_s / self.admitted:.3f} s per admission (mean)")
        if self.kv_peak_blocks:
            lines.append(f"  KV cache peak {self.kv_peak_blocks} blocks ({self.kv_peak_blocks * self.kv_block_bytes / 2**30:.3f} GiB)"
                         f" of {self.kv_total_blocks}")
        return "\n".join(lines)

    @classmethod
    def merged(cls, stages: list["RunStats"], requests: int, wall_s: float) -> "RunStats":
        """The whole run's figures from each stage's share of it."""
        out = cls(requests=requests, wall_s=wall_s)
        for s in stages:
            out.forwards += s.forwards
            out.graph_forwards += s.graph_forwards
            out.decoded_tokens += s.decoded_tokens
            out.denoise_steps += s.denoise_steps
            out.denoise_branch_evals += s.denoise_branch_evals
            out.images += s.images
            out.queue_s += s.queue_s
            out.admitted += s.admitted
            out.shared_forwards += s.shared_forwards
            out.max_batch_requests = max(out.max_batch_requests, s.max_batch_requests)
            out.kv_peak_blocks = max(out.kv_peak_blocks, s.kv_peak_blocks)
            out.kv_block_bytes = max(out.kv_block_bytes, s.kv_block_bytes)
            out.kv_total_blocks = max(out.kv_total_blocks, s.kv_total_blocks)
            for k, v in s.phase_s.items():
                out.phase_s[k] = out.phase_s.get(k, 0.0) + v
        return out
