"""Calibrated early exit: Learn-then-Test thresholds with a finite-sample guarantee
(`ltt`, `pvalues`, `calibration_run`) and FREE's adaptive Beta-mixture threshold
(`beta_mixture`)."""
