"""Reading WORKDIR/calibration.json (written by launch/calibrate.py): the threshold that
`config.generate.threshold='calibrated'` stands for, in every entry point that decodes."""
from __future__ import annotations

import json
import os
from typing import Optional

from adaptive_depth import cli

CALIBRATION_FILE = 'calibration.json'


def calibrated_threshold(workdir: Optional[str], measure: str,
                         progress=print) -> Optional[float]:
  """The threshold calibration.json in `workdir` holds for `measure`; None = none valid
  (decode at full depth). Says which file it read; a UserError when the file or the
  measure is missing."""
  how = (f'run python launch/calibrate.py --config=... --workdir={workdir or "DIR"} '
         f'--measure={measure}')
  if workdir is None:
    raise cli.UserError(f"threshold='calibrated' reads WORKDIR/{CALIBRATION_FILE}: pass the "
                        f'workdir ({how})')
  path = os.path.join(workdir, CALIBRATION_FILE)
  if not os.path.isfile(path):
    raise cli.UserError(f"threshold='calibrated' needs {path}, which does not exist: {how}")
  with open(path) as f:
    saved = json.load(f)
  if measure not in saved.get('measures', {}):
    raise cli.UserError(f"threshold='calibrated': {path} has no threshold for measure "
                        f'{measure!r} (it has {sorted(saved.get("measures", {}))}): {how}')
  threshold = saved['measures'][measure]['threshold']
  progress(f'threshold {measure} ' +
           ('none valid: full depth' if threshold is None else f'{threshold:g}') +
           f" from {path} (delta {saved['delta']:g}, epsilon {saved['epsilon']:g}, risk "
           f"{saved['risk']}, n {saved['measures'][measure]['n']})")
  return threshold


def resolve_thresholds(config, workdir: Optional[str], measure: str, thresholds: list,
                       progress=print) -> list:
  """`thresholds`, or with config.generate.threshold='calibrated' the calibrated threshold
  of `measure` alone ([] when none is valid: only full depth runs)."""
  if config.generate.threshold != 'calibrated':
    return thresholds
  threshold = calibrated_threshold(workdir, measure, progress)
  return [] if threshold is None else [threshold]
