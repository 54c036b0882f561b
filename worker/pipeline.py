"""The pure scoring path: a batch of input records in, events and dead letters out.

No Kafka, no HTTP, no metrics registry: :class:`Scorer` is what the Kafka loop, the offline
``score-file`` command and the benchmarks all call, so they cannot drift apart.

Decision rule of one reading (docs/detection.md):

* the *compared score* is the model's score — of the reading's window for a windowed model
  (``Detector.window = w > 1``), smoothed per device when the model smooths
  (``Detector.ewma_alpha``: the threshold was fitted on smoothed holdout scores);
* the reading is anomalous when ``compared > threshold × multiplier(device group)``
  (multipliers: ``incidents.threshold_multipliers``; 1 when none matches), **or** when a
  watched constant sensor moved beyond its tolerance (``changed_constants``), whatever the score;
* ``score_ratio = compared ÷ (threshold × multiplier)``.

A windowed model does not score a device's first ``w − 1`` readings after its memory starts
empty (first sight, a model of another shape, a lost state): they fill the window, produce no
event and no dead letter, and are counted in :attr:`BatchResult.warming_up`. Per-point models
without smoothing use no per-device memory and produce exactly the events they always did.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from operator import attrgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from detector import Detector, Scores
from detector.smoothing import ewma_batch
from worker.config import EventSettings, ReadingSettings
from worker.decode import DecodedBatch, Failure, ReadingDecoder
from worker.events import DeviceGroups, EpisodeTracker, build_dead_letter, build_event
from worker.incidents import ScoredBatch, ThresholdMultipliers
from worker.memory import DeviceMemory, gather
from worker.reasons import Reason, Stage
from worker.records import InputRecord, OutputMessage

_VALUE = attrgetter("value")
# A reading anomalous only through a changed watched constant is handed to the incident
# tracker with its score raised just past the effective threshold (ratio ~1: "warning").
_CONSTANT_BUMP = 1.000001


@dataclass(frozen=True, eq=False)
class ReadingScores:
    """Per scored reading (finite or not), in input order: for ``score-file --scores``.

    ``record`` indexes the batch's input records; ``compared`` is the smoothed score when the
    model smooths, else ``score``; ``ratio`` = compared ÷ (threshold × group multiplier);
    ``out_of_range`` maps a row to its ``(feature, excess)`` list (rows inside are absent).
    """

    record: list[int]
    device_ids: list[str]
    ts_ms: npt.NDArray[np.int64]
    score: npt.NDArray[np.float64]
    compared: npt.NDArray[np.float64]
    ratio: npt.NDArray[np.float64]
    anomalous: npt.NDArray[np.bool_]
    out_of_range: dict[int, list[tuple[str, float]]]


@dataclass(eq=False)
class BatchResult:
    """What one batch produced.

    Attributes:
        events: anomaly events, in input order.
        dead_letters: unscorable records, in input order.
        scored: readings that got a finite score.
        score_ratio: compared score ÷ model threshold (no group multiplier) of every scored
            reading, in input order.
        reading_ts_ms: timestamps of the readings that produced ``events`` (for latency).
        scored_by_group / anomalies_by_group: counts per device group label (anomalies after
            the group's threshold multiplier and the watched-constant rule).
        dead_by_reason: counts per dead-letter reason.
        scoring_seconds: wall time of decode + score + encode.
        model_name / model_version: the scoring model (label of the drift metrics).
        expected_rate: the holdout's share of readings above the threshold
            (``Threshold.exceed_rate``; NaN in artifacts without it).
        above_threshold_by_group: scored readings with compared score > model threshold (no
            multiplier): compare with ``expected_rate``.
        out_of_range_by_group: scored readings with a feature outside the training range.
        warming_up / warming_up_by_group: readings not scored because their device's window
            is not full yet (windowed models only).
        replayed: re-delivered readings skipped because the restored device memory already
            holds them (see :class:`worker.memory.DeviceMemory`).
        scored_batch: the scored readings as the incident tracker needs them (only when the
            Scorer was built with ``scored_batch=True``).
        readings: per-reading scores and decisions (only with ``keep_readings=True``).
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
    model_name: str = ""
    model_version: str = ""
    expected_rate: float = float("nan")
    above_threshold_by_group: Counter[str] = field(default_factory=Counter)
    out_of_range_by_group: Counter[str] = field(default_factory=Counter)
    warming_up: int = 0
    warming_up_by_group: Counter[str] = field(default_factory=Counter)
    replayed: int = 0
    scored_batch: ScoredBatch | None = None
    readings: ReadingScores | None = None
    _ratio_parts: tuple[npt.NDArray[np.float64], list[str], Mapping[str, str]] | None = None

    def ratio_by_group(self) -> dict[str, npt.NDArray[np.float64]]:
        """``score_ratio`` split by device group label (for the PSI of the drift metrics)."""
        if self._ratio_parts is None:
            return {}
        ratio, devices, group_of = self._ratio_parts
        groups = list(self.scored_by_group)
        if len(groups) == 1:
            return {groups[0]: ratio}
        code = {g: i for i, g in enumerate(groups)}
        code_of = {d: code[g] for d, g in group_of.items() if g in code}
        codes = np.fromiter(map(code_of.__getitem__, devices), np.intp, count=len(devices))
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(groups) + 1))
        return {g: ratio[order[bounds[i] : bounds[i + 1]]] for i, g in enumerate(groups)}


class Scorer:
    """Scores batches with one detector. Swap detectors by building a new Scorer.

    Not thread-safe (it keeps per-device anomaly runs); one per worker loop.

    Args:
        detector: the model.
        reading / events: input contract and event settings.
        clock_ms: wall clock (epoch ms) for ``detected_at`` and the timestamp checks.
        episodes: anomaly runs to carry over from the previous Scorer (model reload).
        memory: per-device window/EWMA memory, shared across reloads (the Scorer drops it if
            the model's window, features or smoothing differ). Required state for windowed or
            smoothing models; a private one is created when omitted.
        multipliers: per-device-group threshold multipliers (``incidents.threshold_multipliers``).
        scored_batch: also build :attr:`BatchResult.scored_batch` for the incident tracker.
        keep_readings: also build :attr:`BatchResult.readings` (offline, ``score-file``).
    """

    def __init__(
        self,
        detector: Detector,
        reading: ReadingSettings,
        events: EventSettings,
        clock_ms: Callable[[], int] | None = None,
        episodes: EpisodeTracker | None = None,
        memory: DeviceMemory | None = None,
        multipliers: ThresholdMultipliers | None = None,
        scored_batch: bool = False,
        keep_readings: bool = False,
    ) -> None:
        self.detector = detector
        self.events_cfg = events
        self.reading = reading
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._constants = tuple(c.name for c in detector.constants)
        if self._constants:
            # Watched constants are decoded as extra trailing columns. Absent is not an
            # error, so they get their own allowance of missing values; the model's own
            # allowance is checked again below on the model columns alone.
            wide = dataclasses.replace(
                reading, max_imputed_features=reading.max_imputed_features + len(self._constants)
            )
            names = (*detector.feature_names, *self._constants)
            self.decoder = ReadingDecoder(names, wide, now_ms=self._clock_ms)
        else:
            self.decoder = ReadingDecoder(detector.feature_names, reading, now_ms=self._clock_ms)
        self.groups = DeviceGroups(events.device_group_pattern, events.max_device_groups)
        # Kept across model reloads so a running anomaly keeps its start time.
        self.episodes = episodes or EpisodeTracker()
        self.uses_memory = detector.window > 1 or detector.ewma_alpha is not None
        self.memory = memory if memory is not None else DeviceMemory()
        if self.uses_memory:
            self.memory.configure(detector.window, detector.feature_names, detector.ewma_alpha)
        elif len(self.memory):
            # A per-point model needs no memory: forget (and tombstone) what another kept.
            self.memory.configure(1, detector.feature_names, None)
        self.multipliers = multipliers or ThresholdMultipliers([])
        self.build_scored_batch = scored_batch
        self.keep_readings = keep_readings

    # ---- helpers

    def _split_constants(self, batch: DecodedBatch) -> tuple[DecodedBatch, npt.NDArray[np.float64]]:
        """Model columns and watched-constant columns; re-applies the model's missing limit."""
        d = self.detector.n_features
        x = np.ascontiguousarray(batch.x[:, :d])
        consts = np.ascontiguousarray(batch.x[:, d:])
        missing = np.isnan(x).sum(axis=1).astype(np.int64)
        limit = self.reading.max_imputed_features
        too_many = missing > limit
        if not too_many.any():
            return dataclasses.replace(batch, x=x, missing=missing), consts
        failures = list(batch.failures)
        keep = ~too_many
        for j in np.flatnonzero(too_many).tolist():
            names = [self.detector.feature_names[k] for k in np.flatnonzero(np.isnan(x[j]))]
            failures.append(
                Failure(
                    batch.index[j],
                    Reason.MISSING_FIELD,
                    Stage.VALIDATE,
                    "MissingFeature",
                    f"missing or null features {names[:10]} (more than {limit} allowed)",
                )
            )
        failures.sort(key=lambda f: f.index)
        kept = keep.tolist()
        return (
            DecodedBatch(
                index=list(compress(batch.index, kept)),
                x=x[keep],
                device_ids=list(compress(batch.device_ids, kept)),
                timestamps_ms=batch.timestamps_ms[keep],
                missing=missing[keep],
                failures=failures,
            ),
            consts[keep],
        )

    def _replayed_rows(
        self, records: Sequence[InputRecord], batch: DecodedBatch
    ) -> npt.NDArray[np.bool_] | None:
        """Rows of devices restored from the store that the restored memory already holds."""
        guard = self.memory.guard
        hit = guard.keys() & set(batch.device_ids)
        if not hit:
            return None
        skip = np.zeros(len(batch.index), dtype=bool)
        past: set[str] = set()  # guarded devices with a reading newer than their state
        for j, dev in enumerate(batch.device_ids):
            pos = guard.get(dev)
            if pos is None:
                continue
            rec = records[batch.index[j]]
            if rec.topic == pos[0] and rec.partition == pos[1] and rec.offset <= pos[2]:
                skip[j] = True
            else:
                past.add(dev)
        # Re-deliveries can span batches: a device stays guarded until a newer reading.
        for dev in past:
            del guard[dev]
        return skip if skip.any() else None

    # ---- the batch

    def process(self, records: Sequence[InputRecord]) -> BatchResult:
        """Decode, validate, score and classify ``records``. Never raises for bad input."""
        t0 = time.perf_counter()
        det = self.detector
        out = BatchResult(
            model_name=det.info.name,
            model_version=det.info.version,
            expected_rate=det.threshold.exceed_rate,
        )
        batch, consts = self._decode(records, out)
        if batch.index:
            rows = self._score(records, batch, consts, out)
            if rows is not None and len(rows.s):
                self._classify(records, rows, out)
        out.scoring_seconds = time.perf_counter() - t0
        return out

    def _decode(
        self, records: Sequence[InputRecord], out: BatchResult
    ) -> tuple[DecodedBatch, npt.NDArray[np.float64] | None]:
        """Decoded rows (replays skipped) and their watched-constant columns; dead letters."""
        batch = self.decoder.decode(list(map(_VALUE, records)))
        consts: npt.NDArray[np.float64] | None = None
        if self._constants:
            batch, consts = self._split_constants(batch)
        version = self.detector.info.version
        for f in batch.failures:
            out.dead_letters.append(
                build_dead_letter(
                    records[f.index], f.reason, f.stage, f.exception, f.message, version
                )
            )
            out.dead_by_reason[f.reason] += 1
        if self.uses_memory and self.memory.guard and batch.index:
            skip = self._replayed_rows(records, batch)
            if skip is not None:
                out.replayed = int(skip.sum())
                batch = _take(batch, ~skip)
                if consts is not None:
                    consts = consts[~skip]
        return batch, consts

    def _score(
        self,
        records: Sequence[InputRecord],
        batch: DecodedBatch,
        consts: npt.NDArray[np.float64] | None,
        out: BatchResult,
    ) -> _Rows | None:
        """Scores of the rows that can be scored (all but window warm-up); memory updated."""
        det = self.detector
        history: Mapping[str, Any] | None = None
        sel: npt.NDArray[np.intp] | None = None  # scored rows of the batch; None = all
        if det.window > 1:
            mem = self.memory.history
            prior = {d: mem[d] for d in set(batch.device_ids).intersection(mem)}
            windows, ends, history = gather(prior, batch.device_ids, batch.x, det.window)
            scores = det.score_windows(windows)
            if len(ends) != len(batch.index):
                sel = ends
        else:
            scores = det.score(batch.x)
        if sel is None:
            rows = _Rows(batch.x, batch.device_ids, batch.timestamps_ms, batch.index,
                         batch.missing, consts, scores, scores.score)  # fmt: skip
        else:
            warm = np.ones(len(batch.index), dtype=bool)
            warm[sel] = False
            out.warming_up = int(warm.sum())
            warm_devs = Counter(compress(batch.device_ids, warm.tolist()))
            for d, g in self.groups.many(warm_devs).items():
                out.warming_up_by_group[g] += warm_devs[d]
            sel_l = sel.tolist()
            rows = _Rows(
                batch.x[sel],
                [batch.device_ids[j] for j in sel_l],
                batch.timestamps_ms[sel],
                [batch.index[j] for j in sel_l],
                batch.missing[sel],
                None if consts is None else consts[sel],
                scores,
                scores.score,
            )
        ewma_state: dict[str, float] | None = None
        if det.ewma_alpha is not None and len(rows.s):
            em = self.memory.ewma
            prior_e = {d: em[d] for d in set(rows.devices).intersection(em)}
            rows.cmp, ewma_state = ewma_batch(prior_e, rows.devices, rows.s, det.ewma_alpha)
        if self.uses_memory:
            # Every device of the batch (warm-up rows included) moved its memory on.
            positions = {}
            for d, i in dict(zip(batch.device_ids, batch.index, strict=True)).items():
                r = records[i]
                positions[d] = (r.topic, r.partition, r.offset)
            self.memory.update(history, ewma_state, positions)
        return rows

    def _classify(self, records: Sequence[InputRecord], rows: _Rows, out: BatchResult) -> None:
        """Decisions, counts, drift signals, events and the incident tracker's batch."""
        det = self.detector
        devices, cmp, n = rows.devices, rows.cmp, len(rows.s)
        finite = np.isfinite(rows.s)
        thr = det.threshold.value
        per_device = Counter(devices)
        group_of = self.groups.many(per_device)
        above_model = (cmp > thr) & finite
        mults: npt.NDArray[np.float64] | None = None
        if self.multipliers:
            mult_of = {d: self.multipliers.for_group(g) for d, g in group_of.items()}
            if any(m != 1.0 for m in mult_of.values()):
                mults = np.fromiter(map(mult_of.__getitem__, devices), np.float64, count=n)
        anomalous = above_model if mults is None else (cmp > thr * mults) & finite
        changed: npt.NDArray[np.bool_] | None = None
        by_constant: npt.NDArray[np.bool_] | None = None
        if rows.consts is not None:
            changed = det.changed_constants(rows.consts)
            by_constant = changed.any(axis=1) & finite
            if by_constant.any():
                anomalous = anomalous | by_constant
            else:
                by_constant = None
        ratio = cmp[finite] / thr
        out.score_ratio = ratio
        out.scored = int(finite.sum())
        # Group labels per distinct device (in first-seen order, as a per-row pass would
        # register them), counts per device: no Python work per normal row.
        fin_l = None if out.scored == n else finite.tolist()
        if fin_l is None:
            for d, c in per_device.items():
                out.scored_by_group[group_of[d]] += c
        else:
            out.scored_by_group.update(group_of[d] for d in compress(devices, fin_l))
        # Without multipliers or changed constants "above the model threshold" is exactly
        # "anomalous", counted per group by _emit: copy that count instead of a second pass.
        same = anomalous is above_model
        self._drift(rows, group_of, ratio, fin_l, None if same else above_model, finite, out)
        hot_rows = np.flatnonzero(anomalous).tolist()
        cfg = self.events_cfg
        contributors = dict(
            zip(
                hot_rows,
                det.contributions_many(
                    rows.x, rows.scores, hot_rows, top=cfg.top_sensors, min_share=cfg.min_share
                ),
                strict=True,
            )
        )
        if self.build_scored_batch:
            out.scored_batch = self._scored_batch(
                records, rows, group_of, finite, mults, by_constant, contributors, thr
            )
        if self.keep_readings:
            out.readings = self._readings(rows, anomalous, thr if mults is None else thr * mults)
        self._emit(records, rows, finite, anomalous, hot_rows, contributors, group_of, mults,
                   changed, out)  # fmt: skip
        if same:
            out.above_threshold_by_group = out.anomalies_by_group.copy()

    def _drift(
        self,
        rows: _Rows,
        group_of: Mapping[str, str],
        ratio: npt.NDArray[np.float64],
        fin_l: list[bool] | None,
        above_model: npt.NDArray[np.bool_] | None,
        finite: npt.NDArray[np.bool_],
        out: BatchResult,
    ) -> None:
        """Drift counts: ratios per group, above the model threshold, out of training range."""
        devices = rows.devices
        # The per-group split of the ratios is left to whoever asks (the drift metrics):
        # keep what it needs, not the per-row work.
        out._ratio_parts = (ratio, devices if fin_l is None else list(compress(devices, fin_l)),
                            group_of)  # fmt: skip
        if above_model is not None:
            above_rows = np.flatnonzero(above_model).tolist()
            if above_rows:
                out.above_threshold_by_group.update(group_of[devices[j]] for j in above_rows)
        lo, hi = self.detector.train_min, self.detector.train_max
        if lo is not None and hi is not None:
            with np.errstate(invalid="ignore"):
                oor = ((rows.x > hi) | (rows.x < lo)).any(axis=1) & finite
            rows.oor = oor
            oor_rows = np.flatnonzero(oor).tolist()
            if oor_rows:
                out.out_of_range_by_group.update(group_of[devices[j]] for j in oor_rows)

    def _emit(
        self,
        records: Sequence[InputRecord],
        rows: _Rows,
        finite: npt.NDArray[np.bool_],
        anomalous: npt.NDArray[np.bool_],
        hot_rows: list[int],
        contributors: Mapping[int, Any],
        group_of: Mapping[str, str],
        mults: npt.NDArray[np.float64] | None,
        changed: npt.NDArray[np.bool_] | None,
        out: BatchResult,
    ) -> None:
        """Dead letters of non-finite scores, anomaly runs, events."""
        det = self.detector
        info = det.info
        cfg = self.events_cfg
        devices, s, x = rows.devices, rows.s, rows.x
        # Rows that need per-row work: non-finite scores (dead letters), anomalous
        # readings (events), and normal readings of devices with an open anomaly run
        # (they end it). Any other normal row would only pop an absent key.
        todo = set(np.flatnonzero(~finite).tolist()).union(hot_rows)
        watch = {devices[j] for j in hot_rows}
        watch.update(self.episodes.devices())
        if watch:
            todo.update(compress(range(len(devices)), map(watch.__contains__, devices)))
        now = self._clock_ms()
        thr = det.threshold.value
        for j in sorted(todo):
            dev = devices[j]
            rec = records[rows.index[j]]
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
            ts = int(rows.ts_ms[j])
            run = self.episodes.update(dev, ts, bool(anomalous[j]))
            if run is None:
                continue
            out.anomalies_by_group[group_of[dev]] += 1
            if run[1] < cfg.min_consecutive:
                continue  # debounced: counted as anomalous, not (yet) announced
            imputed = (
                [det.feature_names[k] for k in np.flatnonzero(np.isnan(x[j]))]
                if rows.missing[j]
                else []
            )
            mult = 1.0 if mults is None else float(mults[j])
            out.events.append(
                build_event(
                    record=rec,
                    device_id=dev,
                    ts_ms=ts,
                    detected_ms=now,
                    score=float(s[j]),
                    threshold=thr * mult,
                    contributors=contributors[j],
                    imputed=imputed,
                    since=run,
                    model_name=info.name,
                    model_version=info.version,
                    compared=float(rows.cmp[j]) if det.ewma_alpha is not None else None,
                    extra=self._extra(rows, j, mult, changed),
                )
            )
            out.reading_ts_ms.append(ts)

    def _extra(
        self, rows: _Rows, j: int, mult: float, changed: npt.NDArray[np.bool_] | None
    ) -> dict[str, Any] | None:
        """The optional event fields of row ``j`` (None for a plain per-point model)."""
        det = self.detector
        extra: dict[str, Any] = {}
        if det.window > 1:
            extra["window"] = det.window
        if det.ewma_alpha is not None:
            extra["smoothed_score"] = float(rows.cmp[j])
        if mult != 1.0:
            extra["threshold_multiplier"] = mult
        if rows.oor is not None:
            extra["out_of_range"] = (
                det.out_of_range(rows.x[j : j + 1]).features(0) if rows.oor[j] else []
            )
        if changed is not None and rows.consts is not None:
            extra["changed_constants"] = [
                (c.name, c.value, float(rows.consts[j, k]))
                for k, c in enumerate(det.constants)
                if changed[j, k]
            ]
        return extra or None

    def _readings(
        self,
        rows: _Rows,
        anomalous: npt.NDArray[np.bool_],
        eff: float | npt.NDArray[np.float64],
    ) -> ReadingScores:
        oor: dict[int, list[tuple[str, float]]] = {}
        if rows.oor is not None and rows.oor.any():
            found = np.flatnonzero(rows.oor)
            info = self.detector.out_of_range(rows.x[found])
            oor = {int(j): info.features(i) for i, j in enumerate(found.tolist())}
        with np.errstate(invalid="ignore", over="ignore"):
            ratio = rows.cmp / eff
        return ReadingScores(
            record=list(rows.index),
            device_ids=list(rows.devices),
            ts_ms=rows.ts_ms,
            score=rows.s,
            compared=rows.cmp,
            ratio=np.asarray(ratio, dtype=np.float64),
            anomalous=anomalous,
            out_of_range=oor,
        )

    def _scored_batch(
        self,
        records: Sequence[InputRecord],
        rows: _Rows,
        group_of: Mapping[str, str],
        finite: npt.NDArray[np.bool_],
        mults: npt.NDArray[np.float64] | None,
        by_constant: npt.NDArray[np.bool_] | None,
        contributors: Mapping[int, Any],
        thr: float,
    ) -> ScoredBatch:
        """The finitely scored rows as the incident tracker's columns (row numbers renumbered)."""
        devices, ts_ms = rows.devices, rows.ts_ms
        scores = np.array(rows.cmp, dtype=np.float64)
        if by_constant is not None:
            eff = thr * (mults if mults is not None else 1.0)
            scores = np.where(by_constant, np.maximum(scores, eff * _CONSTANT_BUMP), scores)
        if finite.all():
            fin = list(range(len(devices)))
            contribs: Mapping[int, Any] = contributors
        else:
            fin = np.flatnonzero(finite).tolist()
            new_row = {old: new for new, old in enumerate(fin)}
            contribs = {new_row[j]: c for j, c in contributors.items() if j in new_row}
            scores = scores[finite]
            ts_ms = ts_ms[finite]
        recs = [records[rows.index[j]] for j in fin]
        devs = [devices[j] for j in fin]
        return ScoredBatch(
            device_ids=devs,
            device_groups=[group_of[d] for d in devs],
            ts_ms=np.asarray(ts_ms, dtype=np.int64),
            scores=scores,
            threshold=thr,
            topics=[r.topic for r in recs],
            partitions=np.fromiter((r.partition for r in recs), np.int64, count=len(recs)),
            offsets=np.fromiter((r.offset for r in recs), np.int64, count=len(recs)),
            contributors=contribs,
            model_name=self.detector.info.name,
            model_version=self.detector.info.version,
        )


@dataclass(eq=False)
class _Rows:
    """The scored rows of a batch (a subset of the decoded rows for a windowed model)."""

    x: npt.NDArray[np.float64]
    devices: list[str]
    ts_ms: npt.NDArray[np.int64]
    index: list[int]  # position of each row in the input records
    missing: npt.NDArray[np.int64]
    consts: npt.NDArray[np.float64] | None
    scores: Scores
    s: npt.NDArray[np.float64]  # raw score
    cmp: npt.NDArray[np.float64] = field(init=False)  # compared score (smoothed if smoothing)
    oor: npt.NDArray[np.bool_] | None = None  # row has a feature outside the training range

    def __post_init__(self) -> None:
        self.cmp = self.s


def _take(batch: DecodedBatch, keep: npt.NDArray[np.bool_]) -> DecodedBatch:
    kept = keep.tolist()
    return DecodedBatch(
        index=list(compress(batch.index, kept)),
        x=batch.x[keep],
        device_ids=list(compress(batch.device_ids, kept)),
        timestamps_ms=batch.timestamps_ms[keep],
        missing=batch.missing[keep],
        failures=[],
    )
