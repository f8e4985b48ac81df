"""What people read: the cohort report (jinja2), charts (matplotlib), attention heatmaps and the
report's tables."""
