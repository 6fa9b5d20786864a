"""Fit the decode spec's false-positive rescorer (:class:`edge.decode.rescoring.FindingRescorer`).

Training examples are the findings of annotated VALIDATION series, decoded
without any shape prior: a finding that hits a nodule (LUNA16's rule, strictly
within d/2 of its centre) is a positive, every other one a negative. The model
is an L2-regularised logistic regression on standardised features, fitted by
Newton's method (a convex problem: the optimum does not depend on a seed).
:func:`cross_validated_cpm` scores it on series it was not fitted on, to compare
it fairly with the hand-set shape prior.
"""

from typing import Dict, List, Sequence, Tuple

import numpy as np

from edge.decode.findings import Finding
from edge.decode.rescoring import FEATURE_NAMES, FindingRescorer, features_matrix
from edge.errors import ConfigError
from toolchain.evaluation.froc import (Candidates, Nodules, evaluate_froc, match_candidates,
                                      threshold_at_fp_rate)


def finding_labels(findings: Dict[str, List[Finding]], nodules: Nodules) -> Tuple[np.ndarray, np.ndarray]:
    """Features and labels (1: hits a nodule) of every finding, series in ``findings`` order."""
    r2 = nodules.hit_radius_squared()
    by_uid: Dict[str, List[int]] = {}
    for n, uid in enumerate(nodules.seriesuids):
        by_uid.setdefault(uid, []).append(n)
    rows, labels = [], []
    for uid, found in findings.items():
        rows.extend(found)
        members = by_uid.get(uid, [])
        for f in found:
            c = np.array([f.x, f.y, f.z])
            labels.append(any(float(np.sum((c - nodules.centers[n]) ** 2)) < r2[n] for n in members))
    return features_matrix(rows), np.array(labels, float)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 50) -> Tuple[np.ndarray, float]:
    """Weights and bias minimising mean log loss + ``l2`` / 2 * |w|^2 / n (bias not penalised)."""
    n, k = x.shape
    a = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(k + 1)
    penalty = np.full(k + 1, l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ theta, -60.0, 60.0)))
        grad = a.T @ (p - y) + penalty * theta
        hess = (a * (p * (1.0 - p))[:, None]).T @ a + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return theta[:-1], float(theta[-1])


def fit_rescorer(x: np.ndarray, y: np.ndarray, l2: float = 1.0,
                 features: Sequence[str] = FEATURE_NAMES) -> FindingRescorer:
    """A rescorer over ``features`` fitted to rows ``x`` (all of FEATURE_NAMES) and labels ``y``."""
    if not (l2 >= 0):
        raise ConfigError(f"rescorer l2 must be >= 0, got {l2!r}")
    positives = int(np.sum(y == 1))
    if positives < 2 or positives > len(y) - 2:
        raise ConfigError(f"cannot fit a rescorer from {positives} nodule hit(s) among {len(y)} findings: "
                          "the validation series need nodules the model finds, and false positives")
    cols = [FEATURE_NAMES.index(f) for f in features]
    sub = x[:, cols]
    mean = sub.mean(axis=0)
    scale = sub.std(axis=0)
    scale[scale < 1e-6] = 1.0
    w, b = fit_logistic((sub - mean) / scale, y, l2)
    return FindingRescorer(tuple(features), tuple(mean.tolist()), tuple(scale.tolist()), tuple(w.tolist()), b)


def folds_by_uid(findings_per_folder: Sequence[Dict[str, List[Finding]]], folds: int) -> Dict[str, int]:
    """Series in sorted UID order dealt round-robin into ``folds`` folds (balanced, no seed)."""
    uids = sorted({uid for findings in findings_per_folder for uid in findings})
    return {uid: n % folds for n, uid in enumerate(uids)}


def findings_candidates(findings: Dict[str, List[Finding]], probabilities: Dict[str, np.ndarray]) -> Candidates:
    """LUNA16 candidates: every finding's centre with its probability from ``probabilities`` (per series UID)."""
    uids, centres, probs = [], [], []
    for uid, found in findings.items():
        for f, p in zip(found, probabilities[uid]):
            uids.append(uid)
            centres.append((f.x, f.y, f.z))
            probs.append(p)
    return Candidates(tuple(uids), np.array(centres, float).reshape(-1, 3), np.array(probs, float))


def findings_cpm(findings: Dict[str, List[Finding]], probabilities: Dict[str, np.ndarray], nodules: Nodules,
                 scans: Sequence[str]) -> float:
    """CPM of ``findings`` scored with ``probabilities`` (per series UID, one per finding)."""
    return float(evaluate_froc(nodules, findings_candidates(findings, probabilities), scans).cpm)


def rescored_cpm(findings: Dict[str, List[Finding]], nodules: Nodules, scans: Sequence[str],
                 rescorer: FindingRescorer) -> float:
    """CPM of ``findings`` with every probability replaced by ``rescorer``'s."""
    probs = {uid: rescorer.probabilities(features_matrix(found)) for uid, found in findings.items()}
    return findings_cpm(findings, probs, nodules, scans)


def cross_validated_probabilities(findings_per_folder: Sequence[Dict[str, List[Finding]]],
                                  nodules_per_folder: Sequence[Nodules], l2: float,
                                  folds: int = 5) -> List[Dict[str, np.ndarray]]:
    """Per folder and series UID, the findings' probabilities from a rescorer fitted on the other folds' series."""
    if folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds}")
    data = [finding_labels(f, n) for f, n in zip(findings_per_folder, nodules_per_folder)]
    fold_of = folds_by_uid(findings_per_folder, folds)
    fold_ids = []
    for findings in findings_per_folder:
        fold_ids.append(np.concatenate([np.full(len(found), fold_of[uid]) for uid, found in findings.items()]
                                       or [np.zeros(0, int)]))
    x_all = np.vstack([d[0] for d in data])
    y_all = np.concatenate([d[1] for d in data])
    f_all = np.concatenate(fold_ids)
    held_out = np.zeros(len(y_all))
    for k in range(folds):
        test = f_all == k
        if not test.any():
            continue
        model = fit_rescorer(x_all[~test], y_all[~test], l2)
        held_out[test] = model.probabilities(x_all[test])
    out, start = [], 0
    for findings in findings_per_folder:
        probs = {}
        for uid, found in findings.items():
            probs[uid] = held_out[start:start + len(found)]
            start += len(found)
        out.append(probs)
    return out


def cross_validated_cpm(findings_per_folder: Sequence[Dict[str, List[Finding]]], nodules_per_folder: Sequence[Nodules],
                        scans_per_folder: Sequence[Sequence[str]], l2: float, folds: int = 5) -> Tuple[float, ...]:
    """CPM per folder, each series rescored by a model fitted on the other folds' series (split by series UID)."""
    probs = cross_validated_probabilities(findings_per_folder, nodules_per_folder, l2, folds)
    return tuple(findings_cpm(f, p, n, s) for f, p, n, s in zip(findings_per_folder, probs, nodules_per_folder,
                                                          scans_per_folder))


def threshold_at(findings_per_folder: Sequence[Dict[str, List[Finding]]],
                 probabilities_per_folder: Sequence[Dict[str, np.ndarray]], nodules_per_folder: Sequence[Nodules],
                 scans_per_folder: Sequence[Sequence[str]], fp_per_scan: float) -> float:
    """The probability at which all folders together give at most ``fp_per_scan`` false positives per scan."""
    # series UIDs are unique across folders: one pooled matching
    findings, probabilities = {}, {}
    for f, p in zip(findings_per_folder, probabilities_per_folder):
        findings.update(f)
        probabilities.update(p)
    nodules = Nodules(tuple(u for n in nodules_per_folder for u in n.seriesuids),
                      np.vstack([n.centers.reshape(-1, 3) for n in nodules_per_folder]),
                      np.concatenate([n.diameters for n in nodules_per_folder]))
    scans = [u for s in scans_per_folder for u in s]
    pooled = match_candidates(nodules, findings_candidates(findings, probabilities), scans)
    return threshold_at_fp_rate(pooled, fp_per_scan)


def fit_rescorer_on(findings_per_folder: Sequence[Dict[str, List[Finding]]], nodules_per_folder: Sequence[Nodules],
                    l2: float) -> FindingRescorer:
    """The rescorer fitted on every finding of every folder."""
    data = [finding_labels(f, n) for f, n in zip(findings_per_folder, nodules_per_folder)]
    return fit_rescorer(np.vstack([d[0] for d in data]), np.concatenate([d[1] for d in data]), l2)


def rescorer_trials(findings_per_folder: Sequence[Dict[str, List[Finding]]], nodules_per_folder: Sequence[Nodules],
                    scans_per_folder: Sequence[Sequence[str]], l2_values: Sequence[float],
                    folds: int = 5) -> List[dict]:
    """``{"l2", "cpm" (per folder), "mean_cpm"}`` of the cross-validated rescorer for every L2 penalty."""
    rows = []
    for l2 in l2_values:
        cpm = cross_validated_cpm(findings_per_folder, nodules_per_folder, scans_per_folder, l2, folds)
        rows.append({"l2": float(l2), "cpm": list(cpm), "mean_cpm": float(np.mean(cpm))})
    return rows
