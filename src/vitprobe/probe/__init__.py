"""Probing: heads trained on token caches (engine, protocols, selection and health, runs, predictions)."""

from vitprobe.probe.predict import PredictConfig, predict
from vitprobe.probe.protocols import PROTOCOLS, ProbeConfig, Protocol
from vitprobe.probe.runs import run_probe
from vitprobe.probe.saved import load_head, save_head
from vitprobe.probe.train import ProbeOutcome, ReadoutResult, train_probes

__all__ = [
    "PROTOCOLS",
    "PredictConfig",
    "ProbeConfig",
    "ProbeOutcome",
    "Protocol",
    "ReadoutResult",
    "load_head",
    "predict",
    "run_probe",
    "save_head",
    "train_probes",
]
