"""The labelling loop: which image to show next, the labels file, the model refitted as labels come
in, and honest estimates of how good it is on the collection (``imgsent label``; the web page and
its JSON API are :mod:`imgsent.labelserver`).

* **Which image next.** ``random`` (uniform over the images nobody has labelled: the only labels
  that estimate accuracy and class shares honestly), ``active`` (the current model's least sure
  image) or ``mix`` (each pick random or active with even odds, seeded); each label records its mode.
  With several annotators, one pick in five for an annotator who has not seen them is an image
  another annotator labelled (mode ``repeat``), so that their agreement can be measured.
* **The labels file** (:class:`LabelLog`): CSV ``id,path,label,mode,annotator,time,p`` (label empty
  = skipped), one row appended, flushed and fsynced per label before it is acknowledged; undo
  rewrites the file atomically. Reopening it resumes: labelled images are never shown again.
* **Learning** (:mod:`imgsent.adapting`): refitted on a thread of its own after every label, so a
  request never waits for it.
* **Estimates**: accuracy from the ``random`` labels only, each predicted by a fit that did not see
  it (cross-validation), with a Wilson 95 % interval; class shares by :func:`collection.shares`
  (adjusted count and calibrated probability with bootstrap intervals) on those same labels;
  Cohen's kappa between the first two annotators on the images both labelled.
"""

from __future__ import annotations

import csv
import io
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from . import adapting
from .atomicio import atomic_open
from .errors import ImgsentError, one_line
from .options import STRATEGIES
from .specs import file_record
from .training import MARGIN

FIELDS = ("id", "path", "label", "mode", "annotator", "time", "p")
MODES = ("random", "active", "repeat", "user")  # user: labelled by id through the API, never offered
OVERLAP = 0.2  # share of a second annotator's picks that repeat another annotator's images
RESELECT = 5  # the correction's penalty is chosen again once this many (or 10 %) more labels judge it


@dataclass
class LabelRow:
    id: str
    path: str
    label: str | None  # None: skipped
    mode: str
    annotator: str
    time: str
    p: float | None

    def cells(self) -> list[str]:
        p = "" if self.p is None else f"{self.p:.6f}"
        return [self.id, self.path, self.label or "", self.mode, self.annotator, self.time, p]


class LabelLog:
    """The labels file: every row on disk (fsynced) before :meth:`append` returns."""

    def __init__(self, path: str):
        self.path = path
        self.rows: list[LabelRow] = []
        if os.path.exists(path) and os.path.getsize(path) > 0:
            self._read()
        else:
            with atomic_open(path, "w", newline="") as fh:
                csv.writer(fh).writerow(FIELDS)

    def _read(self) -> None:
        try:
            with open(self.path, encoding="utf-8", newline="") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ImgsentError(f"cannot read labels file {self.path}: {one_line(exc)}") from None
        if not text.endswith("\n"):  # a row cut short by a kill: never acknowledged, dropped
            text = text[: text.rfind("\n") + 1]
            self._rewrite_text(text)
        reader = csv.reader(io.StringIO(text))
        header = next(reader, [])
        if tuple(h.strip().lower() for h in header[: len(FIELDS)]) != FIELDS:
            raise ImgsentError(
                f"{self.path} is not a labels file of imgsent label (its header is not {','.join(FIELDS)}); "
                "choose another --out, or move that file away"
            )
        for lineno, cells in enumerate(reader, start=2):
            if len(cells) < len(FIELDS):
                raise ImgsentError(f"labels file {self.path}, line {lineno}: expected {len(FIELDS)} columns")
            rid, path, label, mode, annotator, when, p = cells[: len(FIELDS)]
            self.rows.append(LabelRow(rid, path, label or None, mode, annotator, when, float(p) if p else None))

    def append(self, row: LabelRow) -> None:
        buf = io.StringIO()
        csv.writer(buf).writerow(row.cells())
        with open(self.path, "a", encoding="utf-8", newline="") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.append(row)

    def remove(self, index: int) -> LabelRow:
        """Take row ``index`` out (undo): the whole file is rewritten atomically."""
        row = self.rows.pop(index)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(FIELDS)
        for r in self.rows:
            w.writerow(r.cells())
        self._rewrite_text(buf.getvalue())
        return row

    def _rewrite_text(self, text: str) -> None:
        with atomic_open(self.path, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)


@dataclass
class Offer:
    id: str
    mode: str
    p: float | None
    guess: str | None


class LabelSession:
    """The loop's state over one feature store: thread-safe; the refit runs on its own thread."""

    def __init__(
        self,
        fs,
        log: LabelLog,
        *,
        model=None,
        classes: list[str] | None = None,
        strategy: str = "mix",
        seed: int = 0,
        annotator: str = "annotator",
    ):
        if strategy not in STRATEGIES:
            raise ImgsentError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.classes = list(classes or (model.classes if model is not None else ["negative", "positive"]))
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ImgsentError(f"--classes needs at least two different names, got {','.join(self.classes)}")
        ok = np.asarray(fs.ok, dtype=bool)
        if not ok.any():
            raise ImgsentError("the store has no image that decoded: nothing to label")
        self.ids = [i for i, good in zip(fs.ids, ok) if good]
        self.paths = [p for p, good in zip(fs.paths, ok) if good]
        self.sources = [s for s, good in zip(fs.sources, ok) if good]  # tar members, Parquet cells, URLs
        self.index = {rid: k for k, rid in enumerate(self.ids)}
        self.X = np.ascontiguousarray(fs.X[ok], dtype=np.float32)
        self.blocks, self.recipes, self.header = fs.blocks, fs.recipes, fs.header
        self.start_model = model
        self.prior = adapting.Prior(model, self.classes, self.blocks)
        self.U, self.S = self.prior.inputs(self.X)
        self.pos = self.classes.index("positive") if "positive" in self.classes else len(self.classes) - 1
        self.strategy, self.annotator = strategy, annotator
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.log = log
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.offers: dict[tuple[str, str], Offer] = {}  # (annotator, id) -> what was offered
        self.version = 0  # labels changed this often
        self.fitted_version = -1
        self.correction = adapting.Correction.zero(len(self.classes), self.U.shape[1])
        self.proba = adapting.predict(self.prior, self.correction, self.X)
        self.start_proba = self.proba
        self.estimates: dict = {}
        self.fit_error: str | None = None
        self._selected: tuple[int, float | None] | None = None  # (judging labels, penalty) last chosen
        self._stop = False
        self._check_resumed_rows()
        self._thread = threading.Thread(target=self._refit_loop, name="imgsent-label-fit", daemon=True)
        self._thread.start()
        self._poke()

    # --- state read from the log ----------------------------------------------------------------
    def _check_resumed_rows(self) -> None:
        unknown = [r.id for r in self.log.rows if r.id not in self.index]
        if unknown:
            raise ImgsentError(
                f"labels file {self.log.path} names {len(unknown)} image(s) this store does not hold "
                f"(e.g. {unknown[0]!r}): it was made for another collection; choose another --out"
            )
        bad = sorted({r.label for r in self.log.rows if r.label is not None and r.label not in self.classes})
        if bad:
            raise ImgsentError(
                f"labels file {self.log.path} has label(s) {', '.join(map(repr, bad[:3]))} that are not among the "
                f"classes {','.join(self.classes)}: pass --classes as it was made"
            )

    def _first_labels(self) -> dict[str, LabelRow]:
        """One row per labelled image: the first non-repeat row that has a label."""
        out: dict[str, LabelRow] = {}
        for r in self.log.rows:
            if r.mode != "repeat" and r.id not in out and r.label is not None:
                out[r.id] = r
        return out

    def _seen(self) -> set[str]:
        return {r.id for r in self.log.rows}

    def _done_by(self, annotator: str) -> set[str]:
        return {r.id for r in self.log.rows if r.annotator == annotator}

    # --- the API's verbs ----------------------------------------------------------------------
    def next(self, annotator: str | None = None, wait: float = 0.0) -> Offer | None:
        """The image to show ``annotator`` next (the same one until it is labelled or skipped); None
        when every image is done. ``wait`` > 0: first wait (up to that many seconds) for the model
        to have learnt from every label so far (scripts that want reproducible picks)."""
        annotator = annotator or self.annotator
        with self.lock:
            if wait > 0:
                self.changed.wait_for(lambda: self.fitted_version >= self.version or self._stop, timeout=wait)
            for (who, _rid), offer in self.offers.items():
                if who == annotator:
                    return offer
            offer = self._pick(annotator)
            if offer is not None:
                self.offers[(annotator, offer.id)] = offer
            return offer

    def _pick(self, annotator: str) -> Offer | None:
        seen = self._seen()
        offered = {rid for (_, rid) in self.offers}
        mine = self._done_by(annotator)
        theirs = [rid for rid, r in self._first_labels().items() if r.annotator != annotator and rid not in mine]
        if theirs and (len(self.index) == len(seen) or self.rng.random() < OVERLAP):
            rid = theirs[int(self.rng.integers(len(theirs)))]
            return self._offer(rid, "repeat")
        free = np.asarray([k for k, rid in enumerate(self.ids) if rid not in seen and rid not in offered])
        if len(free) == 0:
            return None
        mode = self.strategy if self.strategy != "mix" else ("random" if self.rng.random() < 0.5 else "active")
        if mode == "random":
            k = int(free[self.rng.integers(len(free))])
        else:
            p = np.sort(self.proba[free], axis=1)
            margin = p[:, -1] - p[:, -2]
            least = np.flatnonzero(margin == margin.min())
            k = int(free[least[self.rng.integers(len(least))]])
        return self._offer(self.ids[k], mode)

    def _offer(self, rid: str, mode: str) -> Offer:
        p = self.proba[self.index[rid]]
        return Offer(rid, mode, float(p[self.pos]), self.classes[int(p.argmax())])

    def label(self, rid: str, label: str | None, annotator: str | None = None) -> int:
        """Record ``label`` (None: skip) of image ``rid``; returns how many images are labelled."""
        annotator = annotator or self.annotator
        if rid not in self.index:
            raise KeyError(rid)
        if label is not None and label not in self.classes:
            raise ValueError(f"label {label!r} is not one of {', '.join(self.classes)}")
        with self.lock:
            offer = self.offers.get((annotator, rid))
            if rid in self._done_by(annotator):
                raise LookupError(f"{rid} is already labelled by {annotator}")
            if rid in self._seen() and (offer is None or offer.mode != "repeat"):
                raise LookupError(f"{rid} is already labelled")
            if offer is None:
                offer = self._offer(rid, "user")
            row = LabelRow(
                rid,
                self.paths[self.index[rid]],
                label,
                offer.mode,
                annotator,
                time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                offer.p,
            )
            self.log.append(row)
            self.offers.pop((annotator, rid), None)
            for key in [k for k in self.offers if k[1] == rid]:
                if self.offers[key].mode != "repeat":
                    self.offers.pop(key)  # another tab was offered it: it gets a new image
            self._poke()
            return len(self._first_labels())

    def undo(self, annotator: str | None = None) -> LabelRow:
        """Take back ``annotator``'s last label (or skip): the image is offered to them again."""
        annotator = annotator or self.annotator
        with self.lock:
            for k in range(len(self.log.rows) - 1, -1, -1):
                if self.log.rows[k].annotator == annotator:
                    break
            else:
                raise LookupError("nothing to undo")
            row = self.log.remove(k)
            for key in [key for key in self.offers if key[0] == annotator]:
                self.offers.pop(key)
            self.offers[(annotator, row.id)] = Offer(row.id, row.mode, row.p, self._offer(row.id, row.mode).guess)
            self._poke()
            return row

    # --- learning -------------------------------------------------------------------------------
    def _poke(self) -> None:
        with self.lock:
            self.version += 1
            self.changed.notify_all()

    def _refit_loop(self) -> None:
        while True:
            with self.lock:
                self.changed.wait_for(lambda: self._stop or self.fitted_version < self.version)
                if self._stop:
                    return
                version = self.version
                rows = list(self._first_labels().values())
                all_rows = list(self.log.rows)
            try:
                result = self._fit(rows, all_rows)
                error = None
            except Exception as exc:  # a failed fit keeps the last model; the page shows why
                result, error = None, one_line(exc)
            with self.lock:
                if result is not None:
                    self.correction, self.proba, self.estimates = result
                self.fit_error = error
                self.fitted_version = version
                self.changed.notify_all()

    def _fit(self, rows: list[LabelRow], all_rows: list[LabelRow]):
        k = np.asarray([self.index[r.id] for r in rows], dtype=np.int64)
        y = np.asarray([self.classes.index(r.label) for r in rows], dtype=np.int64)
        C = len(self.classes)
        U, S = self.U[k], None if self.S is None else self.S[k]
        judge = np.asarray([r.mode == "random" for r in rows], dtype=bool)
        if self.strategy == "active" and not judge.any():
            judge = None  # active alone: its own labels judge (early corrections can hurt: README)
        judges = int(len(y) if judge is None else judge.sum())
        last = self._selected
        if last is None or judges < last[0] or judges >= last[0] + max(RESELECT, last[0] // 10):
            lam = adapting.select_penalty(U, S, y, C, seed=self.seed, judge=judge)
            self._selected = (judges, lam)  # chosen again after RESELECT (or 10 %) more judging labels
        else:
            lam = last[1]
        correction = adapting.fit_penalised(U, S, y, C, lam)
        proba = adapting.predict(self.prior, correction, self.X)
        oof = adapting.out_of_fold(U, S, y, C, correction.lam, seed=self.seed) if len(y) else np.zeros((0, C))
        return correction, proba, self._estimates(rows, all_rows, y, oof, proba)

    def _estimates(self, rows, all_rows, y, oof, proba) -> dict:
        random_rows = np.asarray([r.mode == "random" for r in rows], dtype=bool)
        n = int(random_rows.sum())
        out: dict = {}
        if n:
            hits = int((oof[random_rows].argmax(1) == y[random_rows]).sum())
            lo, hi = adapting.wilson(hits, n)
            out["accuracy"] = {
                "estimate": round(hits / n, 4),
                "low": round(lo, 4),
                "high": round(hi, 4),
                "n": n,
                "method": "random-mode labels, each predicted by a model fitted without it (5-fold); Wilson 95 %",
            }
            base = float(np.bincount(y[random_rows], minlength=len(self.classes)).max() / n)
            if n >= 20 and hits / n < base + MARGIN:
                common = self.classes[int(np.bincount(y[random_rows]).argmax())]
                out["warnings"] = [
                    f"on this collection the model is not clearly better than always answering {common} "
                    f"({100 * base:.0f} % of the random labels): label more, or check the classes"
                ]
            idx = np.asarray([self.index[r.id] for r, m in zip(rows, random_rows) if m])
            start_hits = int((self.start_proba[idx].argmax(1) == y[random_rows]).sum())
            lo, hi = adapting.wilson(start_hits, n)
            out["start_accuracy"] = {"estimate": round(start_hits / n, 4), "low": round(lo, 4), "high": round(hi, 4)}
        else:
            out["accuracy"] = {
                "estimate": None,
                "low": None,
                "high": None,
                "n": 0,
                "method": "no random-mode label yet",
            }
        out["prevalence"] = _Once(lambda: self._prevalence(rows, random_rows, oof, proba))
        out["agreement"] = self._agreement(all_rows)
        return out

    def _prevalence(self, rows, random_rows, oof, proba) -> dict:
        import polars as pl

        from .collection import shares

        counts = Counter(r.label for r, m in zip(rows, random_rows) if m)
        if min(counts.get(c, 0) for c in self.classes) < 5:
            return {"classes": None, "n": int(random_rows.sum()), "why": "needs 5 random-mode labels of each class"}
        p = proba.copy()
        for r, m, q in zip(rows, random_rows, oof):
            if m:
                p[self.index[r.id]] = q  # the sample's own probabilities from fits that did not see it
        df = pl.DataFrame(
            {
                "id": self.ids,
                "path": self.paths,
                "status": ["ok"] * len(self.ids),
                "label": [self.classes[k] for k in p.argmax(1)],
                **{f"p_{c}": p[:, k] for k, c in enumerate(self.classes)},
            }
        )
        sample = {r.id: r.label for r, m in zip(rows, random_rows) if m}
        report = shares(
            df, self.classes, sample=sample, sample_name="random-mode labels", bootstrap=500, seed=self.seed
        )
        method = "adjusted_count" if len(self.classes) == 2 else "calibrated_probability"
        est = {e.cls: e for e in report.estimates if e.method == method}
        return {
            "classes": {
                c: {"estimate": round(e.estimate, 4), "low": _r(e.ci_low), "high": _r(e.ci_high)}
                for c, e in est.items()
            },
            "n": len(sample),
            "method": f"{method} on the random-mode labels (95 % bootstrap interval)",
            "warnings": report.warnings,
        }

    def _agreement(self, all_rows: list[LabelRow]) -> dict | None:
        by: dict[str, dict[str, str]] = {}
        for r in all_rows:
            if r.label is not None:
                by.setdefault(r.annotator, {}).setdefault(r.id, r.label)
        if len(by) < 2:
            return None
        (a, la), (b, lb) = list(by.items())[:2]
        both = sorted(set(la) & set(lb))
        kappa = adapting.cohen_kappa([la[i] for i in both], [lb[i] for i in both])
        return {"annotators": [a, b], "n": len(both), "kappa": None if kappa is None else round(kappa, 4)}

    # --- status and the model -------------------------------------------------------------------
    def status(self) -> dict:
        with self.lock:
            estimates = dict(self.estimates)
        if isinstance(estimates.get("prevalence"), _Once):  # the bootstrap runs once per fit, when asked
            estimates["prevalence"] = estimates["prevalence"]()
        with self.lock:
            first = self._first_labels()
            rows = self.log.rows
            return {
                "labelled": len(first),
                "skipped": sum(1 for r in rows if r.label is None),
                "images": len(self.ids),
                "remaining": len(self.ids) - len(self._seen()),
                "classes": self.classes,
                "by_class": {c: sum(1 for r in first.values() if r.label == c) for c in self.classes},
                "by_mode": dict(Counter(r.mode for r in rows if r.label is not None)),
                "model": {
                    "learnt_from": len(first) if self.fitted_version >= self.version else None,
                    "fitting": self.fitted_version < self.version,
                    "lambda": self.correction.lam,
                    "prior": self.prior.model is not None,
                    "error": self.fit_error,
                },
                **estimates,
            }

    def labelled(self) -> int:
        """How many images have a label."""
        with self.lock:
            return len(self._first_labels())

    def wait_fitted(self, timeout: float = 600.0) -> bool:
        with self.lock:
            return self.changed.wait_for(lambda: self.fitted_version >= self.version, timeout=timeout)

    def current_model(self, labels_file: str | None = None):
        """The current model as a bundle-ready :class:`SentimentModel` (an NN head, see
        :func:`adapting.merge`), its card recording the labels it learnt from."""
        with self.lock:
            correction, first = self.correction, self._first_labels()
        model = adapting.merge(self.prior, correction, self.recipes, self.header)
        counts = Counter(r.label for r in first.values())
        info = {
            "labelled": len(first),
            "per_class": {c: counts.get(c, 0) for c in self.classes},
            "by_mode": dict(Counter(r.mode for r in first.values())),
            "learner": "starting model's logits as a prior + L2-penalised linear correction (imgsent.adapting)",
            "lambda": correction.lam,
        }
        if self.start_model is not None:
            info["started_from"] = self.start_model.training.get("card", {}).get("name") or repr(self.start_model)
        if labels_file is not None:
            info["labels_file"] = file_record(labels_file)
        acc = self.estimates.get("accuracy")
        if self.estimates.get("warnings"):
            info["warnings"] = self.estimates["warnings"]
        if acc and acc.get("estimate") is not None:
            info["held_out"] = {
                "method": acc["method"],
                "accuracy": acc["estimate"],
                "low": acc["low"],
                "high": acc["high"],
            }
        model.training = info
        return model

    def close(self) -> None:
        with self.lock:
            self._stop = True
            self.changed.notify_all()
        self._thread.join(timeout=10)


class _Once:
    """A value computed on first use, once, whichever thread asks first."""

    def __init__(self, fn):
        self.fn, self.lock, self.done, self.value = fn, threading.Lock(), False, None

    def __call__(self):
        with self.lock:
            if not self.done:
                self.value, self.done = self.fn(), True
            return self.value


def _r(v):
    return None if v is None else round(v, 4)


def open_session(
    features: str,
    out: str,
    *,
    model: str | None = None,
    classes: list[str] | None = None,
    strategy: str = "mix",
    seed: int = 0,
    annotator: str | None = None,
) -> LabelSession:
    """A :class:`LabelSession` over the feature store ``features`` (it must hold ``model``'s
    backbones), labels in ``out`` (created, or resumed)."""
    from .features import load
    from .models import resolve_model

    m = resolve_model(model)
    keys = [k for k, _ in m.blocks]
    fs = load(features, backbones=keys, only_ok=False)
    m.check_recipe(fs.header, what=f"store {features}")
    created = not os.path.exists(out)
    log = LabelLog(out)
    try:
        return LabelSession(
            fs,
            log,
            model=m,
            classes=classes,
            strategy=strategy,
            seed=seed,
            annotator=annotator or os.environ.get("USER") or "annotator",
        )
    except BaseException:
        if created and not log.rows:  # a run that never started leaves no empty labels file behind
            os.remove(out)
        raise


def label(
    inputs=(),
    out: str = "labels.csv",
    *,
    features: str | None = None,
    model: str | None = None,
    model_out: str | None = None,
    classes: list[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8750,
    token: str | None = None,
    annotator: str | None = None,
    browser: bool = True,
    strategy: str = "mix",
    seed: int = 0,
    models=(),
    options=None,
    echo=print,
) -> LabelSession:
    """Run the labelling loop until Ctrl-C / SIGTERM: extract ``model``'s backbones of ``inputs``
    into ``features`` first (resumable) when inputs are given, then serve the page. On the way out
    the model as it stands is written to ``model_out`` (when given). Returns the closed session."""
    import secrets
    import warnings

    from .errors import ImgsentWarning
    from .labelserver import bind, serve
    from .training import check_model_output

    if model_out is not None:
        check_model_output(model_out, overwrite=False)
    if features is None and not inputs:
        raise ImgsentError("give images to label (INPUT...) or a feature store (--features STORE)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        warnings.warn(
            f"serving on {host}: anyone who can reach this machine and has the token can label",
            ImgsentWarning,
            stacklevel=2,
        )
    sock = bind(host, port)  # first: a taken port is said before any extraction or file
    try:
        if inputs:
            from .scoring import extract_model_features

            if features is None:
                features = os.path.splitext(out)[0] + ".features"
                echo(f"imgsent label: features of the images go to {features} (resumable; pass --features to choose)")
            summary = extract_model_features(list(inputs), features, model=model, models=models, options=options)
            if options is None or options.progress:
                summary.print("imgsent label (extract)")
        session = open_session(
            features, out, model=model, classes=classes, strategy=strategy, seed=seed, annotator=annotator
        )
        token = token or secrets.token_urlsafe(16)
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{sock.getsockname()[1]}/?token={token}"
        echo(f"imgsent label: {session.labelled()} labelled, {len(session.ids)} images; open {url}")
        echo("imgsent label: Ctrl-C stops (labels are saved as they are given)")
        if browser and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.name == "nt" or _is_mac()):
            import webbrowser

            webbrowser.open(url)
        try:
            serve(session, token, sock)
        finally:
            if model_out is not None:
                session.wait_fitted()
                session.current_model(out).save(model_out)
                echo(f"imgsent label: wrote {model_out} (learnt from {session.labelled()} labels)")
            session.close()
    finally:
        sock.close()
    return session


def _is_mac() -> bool:
    import sys

    return sys.platform == "darwin"
