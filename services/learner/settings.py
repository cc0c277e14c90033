"""Learner settings (env prefix OPD_LEARNER_; shared fields in shared/settings.py).

    opd-learner --help
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import ScoringSettings

if TYPE_CHECKING:
    from services.learner.losses import ObjectiveConfig


class LearnerSettings(ScoringSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_LEARNER_", cli_prog_name="opd-learner")

    model: str = "builtin:student"
    """Student to train: a local HF checkpoint dir, hub id, or builtin:student."""
    http_port: int = 8003
    """Port of the /healthz and /metrics server (0: pick a free one)."""
    batch_size: int = 64
    """Trajectories per optimizer step (B); also the admission-control unit."""
    max_staleness: int = 4
    """Bound on learner version - trajectory version; 0 = strict synchronous training."""
    max_steps: int = 200
    """Optimizer steps before the learner saves the final student and exits (0: run forever)."""
    idle_when_done: bool = False
    """After max_steps (student saved): stay up, healthy and idle until stopped, instead of
    exiting: what a deployment wants (scaling, health checks and restarts keep working)."""
    losses: dict[str, float] = Field(default_factory=lambda: {"fkl_topk": 1.0})
    """Estimators and their weights, JSON, e.g. '{"fkl_topk": 1, "rkl_recompute": 1}'; names and formulas in docs/losses.md."""
    stabiliser: str = "none"
    """Ratio control for rkl_stale/rkl_recompute: none, ppo_clip, decoupled_ppo, m2po, tis, mis, minpro."""
    clip_eps: float = 0.2
    """PPO / decoupled-PPO clip range."""
    is_cap: float = 2.0
    """Cap C of truncated / masked importance sampling."""
    decoupled_cap: float = 5.0
    """Decoupled PPO drops tokens whose pi_prox/mu exceeds this."""
    m2po_tau: float = 0.04
    """M2PO bound on the mean squared log-ratio of kept tokens."""
    vcpo: bool = False
    """VCPO: scale each step's learning rate by sqrt(min(1, ESS/B))."""
    jsd_beta: float = 0.5
    """beta of the generalised JSD estimator (0 forward KL, 1 reverse KL)."""
    skew_alpha: float = 0.1
    """alpha of the skew KL estimators."""
    drift: bool = False
    """Prune-OPD drift control: down-weight positions after student/teacher top-k overlap drops."""
    drift_k: int = 8
    """Top-k size compared by drift control."""
    drift_low: float = 0.25
    """Overlap at or below which a position (and all later ones) gets weight 0."""
    drift_high: float = 0.75
    """Overlap at or above which a position keeps full weight."""
    drift_truncate_below: float = 0.0
    """Truncate the trajectory from the first position with overlap below this (0: off)."""
    gradient_checkpointing: bool = False
    """Recompute the student's layer activations in the backward pass instead of keeping them."""
    lr: float | None = None
    """AdamW learning rate; unset: the estimators' default (services/learner/lr_defaults.py,
    docs/losses.md; with several estimators the smallest of their defaults)."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up over the first steps (fresh AdamW moments are noisy)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After the warm-up: constant, or cosine decay to lr_min_ratio x lr at max_steps."""
    lr_min_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Final learning rate of the cosine schedule, as a fraction of lr."""
    eval_every: int = Field(default=0, ge=0)
    """Greedy accuracy on held-out problems every this many steps (and at the start): printed,
    exported as opd_eval_accuracy, kept as a curve in the run's stats (0: off). The built-in
    task's eval split, or eval_file graded by the verifier; with a prompts_file and no
    eval_file there is nothing held out: no evaluation."""
    eval_problems: int = Field(default=200, ge=1)
    """Held-out problems per evaluation (the built-in task's eval split, or eval_file's first rows)."""
    eval_file: str = ""
    """Held-out prompts in the prompts_file format (JSONL or Parquet), graded by the verifier."""
    eval_max_new_tokens: int = Field(default=8, ge=1)
    """Greedy tokens generated per held-out prompt (the built-in task's answers need 4)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    prompt_backlog: int = 512
    """The prompt feeder keeps this many prompts queued for the rollouts."""
    prompts_file: str = ""
    """Training prompts, JSONL or .parquet: per row `prompt` (text) or `messages` (chat turns),
    optional `answer` and `teacher_id` (shared/datasets.py); empty: the built-in `tasks`.
    Every row is validated before the learner publishes anything."""
    tasks: list[str] = Field(default_factory=lambda: ["addition"])
    """Built-in tasks to train on when there is no prompts_file, JSON, e.g. '["addition", "list"]'
    (shared/builtin_tasks.py). With several, prompts mix them evenly and each prompt's
    teacher_id is its task's name: start a teacher pool per task (`opd-teacher --teacher-id list
    --model builtin:list-teacher`); with one, the default pool scores it."""
    teacher_weights: dict[str, float] = Field(default_factory=dict)
    """Loss weight per teacher id, JSON, e.g. '{"list": 2.0}' (others 1; "" is the default pool):
    multiplies every loss term of that teacher's trajectories."""
    teacher_live_s: float = Field(default=15.0, gt=0)
    """A teacher replica counts as live while its last status report (every 2 s) is younger than
    this; a pool with work queued and no live replica is down (shared/teacher_pools.py)."""
    verifier: str = "exact"
    """Grades completions against answers for the sample accuracy and the held-out evaluation:
    exact, numeric (final number: \\boxed{}, ####, last number), or module:function (shared/verifiers.py)."""
    chat_template: str = ""
    """Jinja chat template for `messages` rows, replacing the student tokenizer's own (empty: its own)."""
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra variables for the chat template, JSON, e.g. '{"enable_thinking": false}'."""
    samples_every: int = Field(default=10, ge=0)
    """Every this many steps, a few trained (prompt, completion, teacher id, reward) samples go
    to the learner's log and the run's samples stream (`opd tail`); 0: off."""
    samples_per_step: int = Field(default=2, ge=1)
    """Samples logged each time."""
    samples_max_entries: int = Field(default=1000, ge=1)
    """The samples stream is capped near this many entries (XADD MAXLEN ~)."""
    keep_versions: int = 3
    """Published weight versions kept on disk (older ones are deleted once keep_versions_s old)."""
    keep_versions_s: float = 60.0
    """A version is deleted only after it has been published this long, whatever keep_versions
    says: a slow rollout still loading it keeps its files."""
    output_dir: str = "runs/default/student"
    """Where the final student (HF checkpoint + tokenizer) is saved when the run ends."""
    reset: bool = False
    """Delete this run's streams, keys and checkpoints before starting: the run starts over. Without
    it a learner resumes from its newest checkpoint, and refuses a run that has state but no checkpoint."""
    resume: bool = True
    """Resume from the newest checkpoint in checkpoint_dir if there is one."""
    checkpoint_dir: str = ""
    """Learner checkpoints (weights, optimizer, consumed ids); default runs/<run>/checkpoints."""
    dedup_window: int = 1000
    """Versions for which trained trajectory ids are remembered to skip duplicate deliveries
    (older ones would be dropped as over-stale anyway); bounds checkpoint size."""
    checkpoint_every: int = 10
    """Steps between checkpoints; trained trajectories are acked only once checkpointed."""
    seed: int = 0
    """Seed for prompt order and torch."""
    procs: int = Field(default=1, ge=1)
    """Processes of this one learner (ranks, one per GPU): N > 1 runs this same command under
    `torchrun --standalone --nproc-per-node N` (services/learner/distributed.py). Ignored
    under torchrun, whose world size counts."""
    parallel: Literal["fsdp", "ddp"] = "fsdp"
    """How N > 1 ranks share the student: fsdp (FSDP2 per decoder layer and root: parameters,
    gradients and AdamW state sharded) or ddp (a replica per rank; also where torch lacks FSDP2)."""
    dist_timeout_s: float = Field(default=600.0, ge=30)
    """N > 1 ranks: a collective waiting longer than this fails and ends the learner (NCCL's
    only way to notice a hung peer; must exceed rank 0's longest stretch without a command:
    an evaluation, a slow publish, a Redis outage)."""

    @field_validator("teacher_weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        from shared.keys import check_teacher_id

        for teacher_id, weight in value.items():
            check_teacher_id(teacher_id)
            if weight < 0:
                raise ValueError(f"teacher_weights[{teacher_id!r}] = {weight}: weights must be >= 0")
        return value

    @model_validator(mode="after")
    def _default_lr(self) -> LearnerSettings:
        from services.learner.lr_defaults import resolve_lr

        self.lr = resolve_lr(self.lr, self.losses)
        return self

    def objective(self) -> ObjectiveConfig:
        """The loss configuration these settings describe (validated here, at start-up)."""
        from services.learner.drift import DriftConfig
        from services.learner.losses import ObjectiveConfig
        from services.learner.stabilisers import StabiliserConfig

        return ObjectiveConfig(
            losses=dict(self.losses),
            stabiliser=StabiliserConfig(self.stabiliser, self.clip_eps, self.is_cap,
                                        self.decoupled_cap, self.m2po_tau),
            vcpo=self.vcpo, jsd_beta=self.jsd_beta, skew_alpha=self.skew_alpha,
            drift=DriftConfig(self.drift, self.drift_k, self.drift_low, self.drift_high,
                              self.drift_truncate_below),
        )
