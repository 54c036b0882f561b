"""The pure scoring path: a batch of input records in, events and dead letters out.

No Kafka, no HTTP, no metrics registry: :class:`Scorer` is what the Kafka loop, the offline
``score-file`` command and the benchmarks all call, so they cannot drift apart.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import compress
from operator import attrgetter

import numpy as np
import numpy.typing as npt

from detector import Detector
from worker.config import EventSettings, ReadingSettings
from worker.decode import ReadingDecoder
from worker.events import DeviceGroups, EpisodeTracker, build_dead_letter, build_event
from worker.reasons import Reason, Stage
from worker.records import InputRecord, OutputMessage

_VALUE = attrgetter("value")


@dataclass(eq=False)
class BatchResult:
    """What one batch produced.

    Attributes:
        events: anomaly events, in input order.
        dead_letters: unscorable records, in input order.
        scored: readings that got a finite score.
        score_ratio: score ÷ threshold of every scored reading.
        reading_ts_ms: timestamps of the readings that produced ``events`` (for latency).
        scored_by_group / anomalies_by_group: counts per device group label.
        dead_by_reason: counts per dead-letter reason.
        scoring_seconds: wall time of decode + score + encode.
    """

    events: list[OutputMessage] = field(default_factory=list)
    dead_letters: list[OutputMessage] = field(default_factory=list)
    scored: int = 0
    score_ratio: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty(0))
    reading_ts_ms: list[int] = field(default_factory=list)
    scored_by_group: Counter[str] = field(default_factory=Counter)
    anomalies_by_group: Counter[str] = field(default_factory=Counter)
    dead_by_reason: Counter[Reason] = field(default_factory=Counter)
    scoring_seconds: float = 0.0


class Scorer:
    """Scores batches with one detector. Swap detectors by building a new Scorer.

    Not thread-safe (it keeps per-device anomaly runs); one per worker loop.
    """

    def __init__(
        self,
        detector: Detector,
        reading: ReadingSettings,
        events: EventSettings,
        clock_ms: Callable[[], int] | None = None,
        episodes: EpisodeTracker | None = None,
    ) -> None:
        self.detector = detector
        self.events_cfg = events
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.decoder = ReadingDecoder(detector.feature_names, reading, now_ms=self._clock_ms)
        self.groups = DeviceGroups(events.device_group_pattern, events.max_device_groups)
        # Kept across model reloads so a running anomaly keeps its start time.
        self.episodes = episodes or EpisodeTracker()

    def process(self, records: Sequence[InputRecord]) -> BatchResult:
        """Decode, validate, score and classify ``records``. Never raises for bad input."""
        t0 = time.perf_counter()
        det = self.detector
        info = det.info
        out = BatchResult()
        batch = self.decoder.decode(list(map(_VALUE, records)))
        for f in batch.failures:
            out.dead_letters.append(
                build_dead_letter(
                    records[f.index], f.reason, f.stage, f.exception, f.message, info.version
                )
            )
            out.dead_by_reason[f.reason] += 1
        if batch.index:
            scores = det.score(batch.x)
            s = scores.score
            finite = np.isfinite(s)
            anomalous = det.is_anomaly(s) & finite
            now = self._clock_ms()
            thr = det.threshold.value
            out.score_ratio = s[finite] / thr
            out.scored = int(finite.sum())
            devices = batch.device_ids
            # Group labels per distinct device (in first-seen order, as a per-row pass
            # would register them), counts per device: no Python work per normal row.
            per_device = Counter(devices)
            group_of = self.groups.many(per_device)
            if out.scored == len(devices):
                for d, n in per_device.items():
                    out.scored_by_group[group_of[d]] += n
            else:
                out.scored_by_group.update(group_of[d] for d in compress(devices, finite.tolist()))
            # Rows that need per-row work: non-finite scores (dead letters), anomalous
            # readings (events), and normal readings of devices with an open anomaly run
            # (they end it). Any other normal row would only pop an absent key.
            bad_rows = np.flatnonzero(~finite).tolist()
            hot_rows = np.flatnonzero(anomalous).tolist()
            rows = set(bad_rows).union(hot_rows)
            watch = {devices[j] for j in hot_rows}
            watch.update(self.episodes.devices())
            if watch:
                rows.update(compress(range(len(devices)), map(watch.__contains__, devices)))
            contributors = dict(
                zip(
                    hot_rows,
                    det.contributions_many(
                        batch.x,
                        scores,
                        hot_rows,
                        top=self.events_cfg.top_sensors,
                        min_share=self.events_cfg.min_share,
                    ),
                    strict=True,
                )
            )
            for j in sorted(rows):
                dev = devices[j]
                rec = records[batch.index[j]]
                if not finite[j]:
                    out.dead_letters.append(
                        build_dead_letter(
                            rec,
                            Reason.NON_FINITE_SCORE,
                            Stage.SCORE,
                            "NonFiniteScore",
                            f"score is {s[j]}: an input overflows the model's range",
                            info.version,
                        )
                    )
                    out.dead_by_reason[Reason.NON_FINITE_SCORE] += 1
                    continue
                ts = int(batch.timestamps_ms[j])
                run = self.episodes.update(dev, ts, bool(anomalous[j]))
                if run is None:
                    continue
                out.anomalies_by_group[group_of[dev]] += 1
                if run[1] < self.events_cfg.min_consecutive:
                    continue  # debounced: counted as anomalous, not (yet) announced
                imputed = (
                    [det.feature_names[k] for k in np.flatnonzero(np.isnan(batch.x[j]))]
                    if batch.missing[j]
                    else []
                )
                out.events.append(
                    build_event(
                        record=rec,
                        device_id=dev,
                        ts_ms=ts,
                        detected_ms=now,
                        score=float(s[j]),
                        threshold=thr,
                        contributors=contributors[j],
                        imputed=imputed,
                        since=run,
                        model_name=info.name,
                        model_version=info.version,
                    )
                )
                out.reading_ts_ms.append(ts)
        out.scoring_seconds = time.perf_counter() - t0
        return out
