"""Every Redis stream and key name of a run, in one place (namespaced `opd:<run>:<name>`).

Each property says what the key holds and who writes/reads it; docs/wire.md §1 has the
full table.

    from shared.keys import Keys
    Keys("myrun").scored  # 'opd:myrun:scored'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TEACHER_ID = re.compile(r"[A-Za-z0-9_./-]{1,128}")
"""What a teacher id may be (a name or a hub id): it becomes part of a stream name and a metric label."""
RUN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""What a run name may be: the second part of every key, `opd:<run>:...`."""


def check_teacher_id(teacher_id: str) -> str:
    """The id itself if it is "" (the default teacher) or a valid name, else ValueError."""
    if teacher_id and not TEACHER_ID.fullmatch(teacher_id):
        raise ValueError(f"teacher id {teacher_id!r}: use 1-128 letters, digits, '_', '.', '/' or '-'")
    return teacher_id


def check_run_name(run: str) -> str:
    """The run name itself if valid, else ValueError (a ':' would break every key's layout)."""
    if not RUN_NAME.fullmatch(run):
        raise ValueError(f"run name {run!r}: use 1-64 letters, digits, '_', '.' or '-'")
    return run


@dataclass(frozen=True)
class Keys:
    """Every Redis stream and key of one run, namespaced by the run name."""

    run: str

    def _k(self, name: str) -> str:
        return f"opd:{self.run}:{name}"

    @property
    def prompts(self) -> str:
        """Stream: Prompt messages, feeder -> rollout."""
        return self._k("prompts")

    @property
    def trajectories(self) -> str:
        """Stream: Trajectory messages, rollout -> teacher."""
        return self._k("trajectories")

    def trajectories_for(self, teacher_id: str) -> str:
        """Stream: the trajectories one teacher pool scores, rollout -> teacher (`--teacher-id`):
        `trajectories:<teacher_id>`; the default teacher ("") reads `trajectories`."""
        return f"{self.trajectories}:{check_teacher_id(teacher_id)}" if teacher_id else self.trajectories

    @property
    def teachers(self) -> str:
        """Hash: teacher id -> JSON status of its pool (replicas, queued, down), written by the
        learner (services/learner/pool_monitor.py, shared/teacher_pools.py), read by rollouts."""
        return self._k("teachers")

    @property
    def parked(self) -> str:
        """Key (expires within seconds): trajectories queued at teacher pools set aside as down,
        refreshed by the learner's pool survey, read by admission control."""
        return self._k("parked")

    @property
    def tokenizer(self) -> str:
        """Key: the student tokenizer's fingerprint (JSON), written by the learner; teachers
        refuse to start with another (shared/tokenizer_check.py)."""
        return self._k("tokenizer")

    @property
    def scored(self) -> str:
        """Stream: ScoredTrajectory messages, teacher -> learner."""
        return self._k("scored")

    @property
    def dead(self) -> str:
        """Stream: entries that failed validation or were dropped, capped (fields m, reason, source, id, bytes)."""
        return self._k("dead")

    @property
    def weights(self) -> str:
        """Key: the newest WeightAnnouncement (msgpack)."""
        return self._k("weights")

    @property
    def versions(self) -> str:
        """Stream: one entry per published version (a wake-up signal, capped in length)."""
        return self._k("versions")

    @property
    def version(self) -> str:
        """Key: the learner's current weight version (int), read by admission control."""
        return self._k("version")

    @property
    def admitted(self) -> str:
        """Key: trajectories admitted for generation so far (int), see shared/admission.py."""
        return self._k("admitted")

    @property
    def admission_tokens(self) -> str:
        """Set: prompt ids admitted and not yet trained or released (each releases once)."""
        return self._k("admission_tokens")

    @property
    def record(self) -> str:
        """Hash: the run-wide invariants (top_k, draws, mc_samples), see shared/run_record.py."""
        return self._k("record")

    @property
    def rollout_seq(self) -> str:
        """Key: rollout replicas started so far (INCR): spreads them over their visible GPUs."""
        return self._k("rollout_seq")

    @property
    def limits(self) -> str:
        """Hash: batch_size and max_staleness, written by the learner, read by admission."""
        return self._k("limits")

    @property
    def replicas(self) -> str:
        """Hash: replica name -> JSON status (service, busy_s, items, tokens, overhead_s, state, at, info)."""
        return self._k("replicas")

    @property
    def produced(self) -> str:
        """Hash: downstream stream -> entries ever handed off to it (audit counts)."""
        return self._k("produced")

    @property
    def stats(self) -> str:
        """Hash: learner progress and run summary (step, consumed, staleness counts...)."""
        return self._k("stats")

    @property
    def samples(self) -> str:
        """Stream: a few trained (prompt, completion, teacher id, reward) samples every N steps,
        capped in length; learner -> `opd tail`."""
        return self._k("samples")

    def all(self) -> list[str]:
        return [
            self.prompts, self.trajectories, self.scored, self.dead,
            self.weights, self.versions, self.version, self.admitted, self.admission_tokens, self.record,
            self.limits, self.replicas, self.produced, self.stats, self.rollout_seq, self.samples,
            self.teachers, self.tokenizer, self.parked,
        ]

    def trajectory_streams(self, client) -> list[str]:
        """Every trajectories stream of the run: the default one and each teacher id's that
        was ever written (the `produced` hash has a field per stream handed off to)."""
        prefix = self.trajectories + ":"
        named = sorted(f.decode() for f in client.hkeys(self.produced) if f.decode().startswith(prefix))
        return [self.trajectories, *named]


GROUPS = {"prompts": "rollout", "trajectories": "teacher", "scored": "learner"}
