"""MTP acceptance metrics of a decode worker leader (/metrics; registered in WorkerMetrics' registry).

Per verify of one request with k drafts, n of them accepted (0..k), n + 1 tokens emitted:
  glm_worker_mtp_proposed_by_position_total{position=j}  drafts proposed at draft position j (1..K)
  glm_worker_mtp_accepted_by_position_total{position=j}  drafts accepted at position j (n >= j)
  glm_worker_mtp_acceptance_length                       histogram of n + 1 (tokens per target forward)
  glm_worker_mtp_mean_acceptance_length                  gauge: sum / count of the histogram
  glm_worker_mtp_acceptance_rate                         gauge: accepted / proposed drafts
(the totals glm_worker_mtp_draft_tokens_total / glm_worker_mtp_accepted_tokens_total are in WorkerMetrics).
Rate per position j = accepted_by_position{j} / proposed_by_position{j}.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class MtpMetrics:
    def __init__(self, registry: CollectorRegistry, worker_id: str, k: int):
        lab = ("worker", "role", "position")
        self._ids = (worker_id, "decode")
        self.k = k
        self._proposed = Counter("glm_worker_mtp_proposed_by_position", "MTP drafts proposed per draft position",
                                 lab, registry=registry)
        self._accepted = Counter("glm_worker_mtp_accepted_by_position", "MTP drafts accepted per draft position",
                                 lab, registry=registry)
        self.length = Histogram("glm_worker_mtp_acceptance_length", "tokens emitted per request per verify (n + 1)",
                                ("worker", "role"), registry=registry,
                                buckets=tuple(float(i) for i in range(1, k + 2))).labels(*self._ids)
        self.mean_length = Gauge("glm_worker_mtp_mean_acceptance_length", "mean tokens per request per verify",
                                 ("worker", "role"), registry=registry).labels(*self._ids)
        self.rate = Gauge("glm_worker_mtp_acceptance_rate", "accepted / proposed MTP drafts",
                          ("worker", "role"), registry=registry).labels(*self._ids)
        self._sum_len, self._num, self._prop, self._acc = 0, 0, 0, 0

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        """One request's verify: num_drafts proposed (0 when it could not draft), num_accepted of them."""
        assert 0 <= num_accepted <= num_drafts <= self.k
        for j in range(1, num_drafts + 1):
            self._proposed.labels(*self._ids, str(j)).inc()
            if j <= num_accepted:
                self._accepted.labels(*self._ids, str(j)).inc()
        self.length.observe(num_accepted + 1)
        self._sum_len += num_accepted + 1
        self._num += 1
        self._prop += num_drafts
        self._acc += num_accepted
        self.mean_length.set(self._sum_len / self._num)
        if self._prop:
            self.rate.set(self._acc / self._prop)
