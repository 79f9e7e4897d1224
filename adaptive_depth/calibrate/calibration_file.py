"""Reading WORKDIR/calibration.json (written by launch/calibrate.py): the threshold that
`config.generate.threshold='calibrated'` stands for, in every entry point that decodes."""
from __future__ import annotations

import json
import os
from typing import Optional

from adaptive_depth import checkpoint as checkpoint_lib
from adaptive_depth import cli

CALIBRATION_FILE = 'calibration.json'


def calibrated_threshold(workdir: Optional[str], measure: str, progress=print, *,
                         kv: Optional[str] = None,
                         model_step: Optional[int] = None) -> Optional[float]:
  """The threshold calibration.json in `workdir` holds for `measure`; None = none valid
  (decode at full depth). Says which file it read. A UserError when the file or the measure
  is missing, when `kv` (the caller's KV policy) differs from the one the continuations were
  calibrated under, or when `model_step` (default: the latest checkpoint step in `workdir`,
  the one every entry point loads) differs from the checkpoint step it calibrated (the
  guarantee is for that decoder and that model only)."""
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
  if kv is not None and saved.get('kv', kv) != kv:
    raise cli.UserError(f"threshold='calibrated': {path} was calibrated under KV policy "
                        f"{saved['kv']!r}, not {kv!r}: set --config.generate.kv={saved['kv']} "
                        f'or recalibrate with --config.calibrate.kv={kv}')
  if model_step is None:
    on_disk = checkpoint_lib.steps_on_disk(os.path.join(workdir, 'checkpoints'))
    model_step = on_disk[-1] if on_disk else None
  if model_step is not None and model_step >= 0 and saved.get('step', model_step) != model_step:
    raise cli.UserError(f"threshold='calibrated': {path} calibrated checkpoint step "
                        f"{saved['step']}, but the model is at step {model_step}: recalibrate "
                        f'({how})')
  threshold = saved['measures'][measure]['threshold']
  progress(f'threshold {measure} ' +
           ('none valid: full depth' if threshold is None else f'{threshold:g}') +
           f" from {path} (delta {saved['delta']:g}, epsilon {saved['epsilon']:g}, risk "
           f"{saved['risk']}, n {saved['measures'][measure]['n']})")
  return threshold


def source(config, workdir: Optional[str]) -> Optional[str]:
  """The calibration file behind config.generate.threshold='calibrated', else None."""
  if config.generate.threshold != 'calibrated':
    return None
  return os.path.join(workdir or '', CALIBRATION_FILE)


def resolve_thresholds(config, workdir: Optional[str], measure: str, thresholds: list,
                       progress=print, kv_policies=()) -> list:
  """`thresholds`, or with config.generate.threshold='calibrated' the calibrated threshold
  of `measure` alone ([] when none is valid: only full depth runs); every KV policy in
  `kv_policies` must be the one it was calibrated under."""
  if config.generate.threshold != 'calibrated':
    return thresholds
  for kv in kv_policies:
    calibrated_threshold(workdir, measure, progress=lambda _: None, kv=kv)
  threshold = calibrated_threshold(workdir, measure, progress)
  return [] if threshold is None else [threshold]


def earlier_measures(workdir: str, step: int, risk: str, delta: float, epsilon: float,
                     settings: dict, progress=print) -> dict:
  """The measures an earlier calibration.json in `workdir` holds, when it was made for the
  same checkpoint, risk, delta, epsilon and pool settings (a new run adds its measures to
  them); else {} (and says that the file is replaced)."""
  path = os.path.join(workdir, CALIBRATION_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    saved = json.load(f)
  same = (saved.get('step'), saved.get('risk'), saved.get('delta'), saved.get('epsilon'),
          saved.get('calibrate')) == (step, risk, delta, epsilon, settings)
  if not same:
    progress(f'{path}: made with other settings; replacing it')
    return {}
  return dict(saved.get('measures', {}))
