"""vltok.eval: what users run to measure a patched model: the shapes benchmark (shapes, shapes_video), the dataset
readers and scoring (datasets, scoring), the runner and ``vltok eval`` (runner, cli), quality tables (quality,
quality_video), speed (speed = ``vltok bench``, video_speed, configs) and the lmms-eval plugin (lmms_plugin, lmms_tasks).
One-off profilers and studies live in :mod:`vltok.eval.tools`; the reference VLMs' training in
:mod:`vltok.train_reference` / :mod:`vltok.train_reference_video`; committed tables in eval/results/ (README.md indexes
them)."""
