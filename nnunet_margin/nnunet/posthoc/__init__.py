"""Post-hoc calibration of trained nnU-Net models: one pipeline (docs/methods.md 6).

- `samples`: each fold's logit sample (validation/logit_sample.nnunet_margin), current for its checkpoint;
- `fit`: `nnunet-margin fit-calibration`, the one fitter (temperature, vector, matrix; per fold or pooled);
- `maps`: calibration_map.json, the one format: the map, its scope and the checkpoints it belongs to, and the
  checks before an export folds it in;
- `legacy_temperature`: the deprecated `fit-temperature` and `export-portable --temperature` (temperature.json).
"""
