"""The vLLM worker hooks' per-step work as it was before batching: references for `opd bench hooks`.

Kept out of the services on purpose; `services/bench/hooks.py` times them against what the
hooks run now. Each is the former hook's code with the engine's state passed in:

* `PerRowMcHook`: the rollout MC hook before services/rollout/mc_record.py. Every step it
  scanned the engine's requests building a tuple per tagged row, copied those logits rows
  (an index on the device), built Python lists of temperatures and top-p, took log mu, one
  multinomial, two device -> host copies, then wrote each row into its request's buffers.
  `nucleus` stands in for vLLM's `apply_top_k_top_p` (the same on CPU; tests/test_vllm.py).
* `PerRequestTeacherHook`: the teacher hook before one-pass scoring. For each request's rows
  in the step: one LM-head application, log_softmax, top-k and five device -> host copies
  (seven with draws), plus a copy of its targets and MC ids to the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from services.rollout.mc_draws import nucleus
from services.rollout.vllm_backend import MC_TAG

if TYPE_CHECKING:
    import torch


class PerRowMcHook:
    """`requests`: request id -> state with `sampling_params` (temperature, top_p, max_tokens,
    extra_args) and `output_token_ids`, as vLLM's model runner holds them."""

    def __init__(self, requests: dict[str, Any], seed: int) -> None:
        self.requests, self.seed, self.gen = requests, seed, None
        self.bufs: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def before_sampler(self, req_ids: list[str], logits: torch.Tensor) -> tuple[list, Any, Any]:
        import torch

        rows = []
        for i, req_id in enumerate(req_ids[:logits.shape[0]]):
            state = self.requests.get(req_id) if req_id is not None else None
            params = getattr(state, "sampling_params", None)
            mark = (params.extra_args or {}).get(MC_TAG) if params is not None else None
            if mark is not None:
                rows.append((i, str(mark[0]), len(state.output_token_ids), int(mark[1]), params))
        idx = logits.new_tensor([r[0] for r in rows], dtype=torch.long)
        return rows, idx, logits.index_select(0, idx).float()

    def after_sampler(self, rows: list, idx: torch.Tensor, saved: torch.Tensor, sampled_all: torch.Tensor) -> None:
        import torch

        sampled = sampled_all.index_select(0, idx)
        lp = self.mu(saved, [r[4] for r in rows])
        if self.gen is None or self.gen.device != lp.device:
            self.gen = torch.Generator(device=lp.device).manual_seed(self.seed)
        n = max(r[3] for r in rows)
        draws = torch.multinomial(lp.exp(), n - 1, replacement=True, generator=self.gen)
        ids = torch.cat([sampled.long()[:, None], draws], 1)
        ids_np = ids.cpu().numpy().astype(np.int32)
        lps_np = lp.gather(1, ids).cpu().numpy()
        for r, (_, tag, t, n_r, params) in enumerate(rows):
            if tag not in self.bufs:
                size = int(params.max_tokens or 0)
                self.bufs[tag] = (np.full((size, n_r), -1, np.int32), np.zeros((size, n_r), np.float32))
            buf_ids, buf_lps = self.bufs[tag]
            if t < buf_ids.shape[0]:
                buf_ids[t], buf_lps[t] = ids_np[r, :n_r], lps_np[r, :n_r]

    @staticmethod
    def mu(logits: torch.Tensor, params: list[Any]) -> torch.Tensor:
        import torch

        temps = [float(p.temperature) for p in params]
        top_ps = [float(p.top_p) for p in params]
        if all(t == 1.0 for t in temps) and all(p >= 1.0 for p in top_ps):
            return torch.log_softmax(logits, dim=-1)
        scaled = logits / logits.new_tensor(temps)[:, None]
        p = None if all(x >= 1.0 for x in top_ps) else logits.new_tensor(top_ps)
        return torch.log_softmax(nucleus(scaled, None, p), dim=-1)

    def take(self, tags: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {tag: self.bufs[tag] for tag in tags if tag in self.bufs}
        self.bufs.clear()
        return out


class PerRequestTeacherHook:
    """One step: `requests` is a list of (job, first job row t0, hidden-state rows, target
    tokens as a list), jobs as services/teacher/step_scores.new_job makes them."""

    def __init__(self, seed: int) -> None:
        self.seed, self.gen = seed, None

    def step(self, requests: list[tuple[dict, int, np.ndarray, list[int]]], hidden: torch.Tensor,
             head: torch.Tensor) -> None:
        import torch

        for job, t0, rows, targets in requests:
            logits = torch.nn.functional.linear(hidden[int(rows[0]): int(rows[-1]) + 1], head)
            lp = torch.log_softmax(logits.float(), dim=-1)
            self.fill(job, t0, lp, torch.tensor(targets, device=lp.device))

    def fill(self, job: dict[str, Any], t0: int, lp: torch.Tensor, targets: torch.Tensor) -> None:
        import torch

        t1 = t0 + lp.shape[0]
        k = job["topk_ids"].shape[1]
        top_lp, top_ids = lp.topk(k, dim=-1)
        job["topk_ids"][t0:t1] = top_ids.cpu().numpy()
        job["topk_logprobs"][t0:t1] = top_lp.cpu().numpy()
        job["tail_mass"][t0:t1] = (1.0 - top_lp.exp().sum(-1)).clamp(0.0, 1.0).cpu().numpy()
        job["sampled"][t0:t1] = lp.gather(-1, targets[:, None])[:, 0].cpu().numpy()
        if job["mc"] is not None:
            ids = torch.from_numpy(job["mc_ids"][t0:t1].astype(np.int64)).to(lp.device)
            job["mc"][t0:t1] = lp.gather(-1, ids).cpu().numpy()
        if job["draw_ids"] is not None:
            if self.gen is None or self.gen.device != lp.device:
                self.gen = torch.Generator(device=lp.device).manual_seed(self.seed)
            draws = torch.multinomial(lp.exp(), job["draw_ids"].shape[1], replacement=True, generator=self.gen)
            job["draw_ids"][t0:t1] = draws.cpu().numpy()
            job["draw_logprobs"][t0:t1] = lp.gather(-1, draws).cpu().numpy()
        job["filled"] += t1 - t0
