"""The stage layer every entry point drives (CLI, web, API, `cai worker`): one function per stage,
`(workspace, round, settings, progress) -> result`, each owning its round status transitions.
Settings live in `settings`, the state machine in `status`, the loop driver in `loop`."""
