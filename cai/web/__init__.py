"""`cai web`: a local, server-rendered UI for auditing the judge (FastAPI and jinja2 templates).
Needs the `web` extra; nothing here is imported unless `cai web` runs."""
