"""Server-side figures from Prometheus `/metrics`, scraped before and after a run (benchmark client).

Any server works: absent metrics leave their figure out. Names are matched by suffix, summed over
labels and over every scraped URL (router and worker health ports); a sample with a `role` label
is also kept per role as `name[role=R]`. The fleet's `glm_worker_kv_transfer_bytes_total` /
`_seconds_total` (the prefill side's when both sides count), `*_kv_pages_used` / `*_kv_pages_free`
(or `*_kv_pages_total`), `*queue*` gauges and `*_mtp_draft_tokens_total` /
`*_mtp_accepted_tokens_total` counters become KV transfer GB/s, pages used, queue depths and MTP acceptance;
any labelled `*expert*` series (e.g. distinct experts touched per MoE layer) is reported as it is.
`process_cpu_seconds_total` is kept per URL: each process's CPU seconds over the run and the cores it
kept busy (1.0 = one core saturated: a single-threaded router at 1.0 is the fleet's bottleneck).
"""

from __future__ import annotations

import threading
from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families

Sample = dict[str, float]  # metric sample name -> value summed over labels and URLs
CPU = "process_cpu_seconds_total"  # prometheus-client's process collector (router and worker leaders)


def parse(text: str) -> Sample:
    out: Sample = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith(("_created", "_bucket")):
                continue
            out[s.name] += float(s.value)
            if "role" in s.labels:
                out[f"{s.name}[role={s.labels['role']}]"] += float(s.value)
            if "expert" in s.name and s.labels:  # per-layer expert coverage keeps its labels
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = float(s.value)
    return dict(out)


def scrape(urls: list[str], timeout_s: float = 5.0) -> tuple[Sample, list[str]]:
    """Summed samples of every URL that answered, and the errors of those that did not."""
    total: Sample = defaultdict(float)
    errors = []
    for url in urls:
        try:
            resp = httpx.get(url, timeout=timeout_s)
            resp.raise_for_status()
            for k, v in parse(resp.text).items():
                total[k] += v
                if k == CPU:  # CPU time is per process: kept per URL as well as summed
                    total[f"{CPU}[url={url}]"] = v
        except Exception as exc:  # noqa: BLE001 - a missing /metrics is reported, not fatal
            errors.append(f"{url}: {type(exc).__name__}: {exc}")
    return dict(total), errors


class PeakSampler:
    """Scrapes `urls` every `period_s` in a thread while a run goes on; keeps each gauge's maximum.

    Gauges (pages used, queue depths, running requests) read after a run are back near zero; their
    peaks over the run are what the report shows next to them.
    """

    def __init__(self, urls: list[str], period_s: float = 0.5):
        self.urls, self.period_s = urls, period_s
        self.peaks: Sample = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def add(self, sample: Sample) -> None:
        for k, v in sample.items():
            if "_total" not in k:
                self.peaks[k] = max(v, self.peaks.get(k, v))

    def _loop(self) -> None:
        while True:  # first sample at once: a short run may end before one period
            sample, errors = scrape(self.urls, timeout_s=max(self.period_s * 4, 1.0))
            if not errors:
                self.add(sample)
            if self._stop.wait(self.period_s):
                return

    def __enter__(self) -> "PeakSampler":
        if self.urls:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _sum(sample: Sample, suffix: str) -> float | None:
    vals = [v for k, v in sample.items() if k.endswith(suffix)]
    return sum(vals) if vals else None


def _sender(sample: Sample, suffix: str) -> float | None:
    """The prefill (sending) side's value when the series is labelled by role, else the plain sum."""
    side = _sum(sample, f"{suffix}[role=prefill]")
    return side if side is not None else _sum(sample, suffix)


def _delta(before: Sample, after: Sample, suffix: str, pick=_sum) -> float | None:
    a = pick(after, suffix)
    if a is None:
        return None
    return a - (pick(before, suffix) or 0.0)


def summarize(before: Sample, after: Sample, duration: float, peaks: Sample | None = None) -> dict:
    """Figures for the report; keys present only when the server exposes their metrics."""
    out: dict = {}
    if peaks:
        if (v := _sum(peaks, "kv_pages_used")) is not None:
            out["kv_pages_used_peak"] = v  # sum of per-worker peaks (they need not coincide)
        out["queue_depths_peak"] = {k: v for k, v in peaks.items() if "queue" in k and "[" not in k}
        out["gauge_peaks"] = peaks
    nbytes = _delta(before, after, "kv_transfer_bytes_total", _sender)
    secs = _delta(before, after, "kv_transfer_seconds_total", _sender)
    if nbytes is not None:
        out["kv_transfer_gb"] = nbytes / 1e9
        out["kv_transfer_gb_per_s_over_run"] = nbytes / 1e9 / duration if duration > 0 else 0.0
        if secs:
            out["kv_transfer_gb_per_s_while_sending"] = nbytes / 1e9 / secs
    used, free = _sum(after, "kv_pages_used"), _sum(after, "kv_pages_free")
    if used is not None:
        out["kv_pages_used"] = used
        out["kv_pages_used_by_role"] = {k.split("[role=")[1][:-1]: v for k, v in after.items()
                                        if "kv_pages_used[role=" in k}
        total = _sum(after, "kv_pages_total")
        out["kv_pages_total"] = total if total is not None else used + (free or 0.0)
    queues = {k: v for k, v in after.items() if "queue" in k and not k.endswith(("_total", "]"))}
    if queues:
        out["queue_depths"] = queues
    drafted = _delta(before, after, "mtp_draft_tokens_total")
    accepted = _delta(before, after, "mtp_accepted_tokens_total")
    if drafted:
        out["mtp_draft_tokens"] = drafted
        out["mtp_accepted_tokens"] = accepted or 0.0
        out["mtp_acceptance_rate"] = (accepted or 0.0) / drafted
    cpu = {k[len(CPU) + 5:-1]: after[k] - before.get(k, 0.0) for k in after if k.startswith(f"{CPU}[url=")}
    if cpu:
        out["process_cpu"] = {url: {"cpu_s": d, "cores_busy": d / duration if duration > 0 else 0.0}
                              for url, d in cpu.items()}
    experts = {k: v for k, v in after.items() if "expert" in k and "{" in k}
    if experts:  # dummy weights can pin tokens to few experts: DESIGN §7 asks to show it
        out["moe_experts"] = experts
    counters = {k: after[k] - before.get(k, 0.0) for k in after if k.endswith("_total") or "_total[" in k}
    out["counter_deltas"] = {k: v for k, v in counters.items() if v}
    return out


def expert_lines(experts: Sample) -> list[str]:
    """One line per (series, role, worker) of the per-layer expert figures: mean / min / max over layers."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for key, value in experts.items():
        name, _, labels = key.partition("{")
        who = ",".join(kv for kv in labels.rstrip("}").split(",") if not kv.startswith("layer="))
        groups[(name, who)].append(value)
    return [f"{name} [{who}]: mean {sum(v) / len(v):.3g}, min {min(v):.3g}, max {max(v):.3g} over {len(v)} layers"
            for (name, who), v in sorted(groups.items())]
