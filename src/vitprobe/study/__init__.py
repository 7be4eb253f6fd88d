"""Studies: `vitprobe run STUDY.toml` runs models × datasets × protocols into caches, results and a report.

`spec` parses and checks the TOML, `plan` lays out the steps with an identity each, `runner` runs those
not done yet (resumable, one backbone load per model) and writes the report. docs/studies/ has examples.
"""

from vitprobe.study.plan import Step, plan
from vitprobe.study.runner import StudyInterrupted, StudyResult, run_study, write_study_report
from vitprobe.study.spec import DatasetEntry, ModelEntry, Study, StudyError, load_study, parse_study

__all__ = [
    "DatasetEntry",
    "ModelEntry",
    "Step",
    "Study",
    "StudyError",
    "StudyInterrupted",
    "StudyResult",
    "load_study",
    "parse_study",
    "plan",
    "run_study",
    "write_study_report",
]
