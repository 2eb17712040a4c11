"""The workspace every entry point (CLI, web, jobs) drives the stages through: settings, one engine
per process with the schema checked once, sessions, the worker identity that claims are made
under, and the factories for policy samplers and judge backends."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cai.config import Settings, load_settings
from cai.registry import EMBEDDED_MODEL

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from cai.backends.base import ChatBackend, Sampler
    from cai.judge_round import JudgeSpec
    from cai.judging import JudgeOptions
    from cai.stages.settings import JudgeEndpoint, SamplingSettings
    from cai.templates import TemplateSet

EMBEDDED_JUDGE_WARNING = (
    "The in-process judge is the embedded 135M model: fine for wiring and offline runs, NOT for "
    "trustworthy labels (measured: it prefers 'A' about 75% of the time whatever the content). "
    "Point the judge at a capable model's endpoint for real labels, and check it with `cai judge calibrate`."
)


@dataclass
class Judge:
    """A judge ready to use: the backend to call, who it is (its identity is computed here, once),
    the templates it renders, and a warning to show when it is not to be trusted."""

    backend: ChatBackend
    spec: JudgeSpec
    templates: TemplateSet
    warning: str | None = None


class Workspace:
    def __init__(
        self,
        settings: Settings | None = None,
        worker_id: str | None = None,
        database_source: str = "database URL",
    ) -> None:
        self.settings = settings or load_settings()
        self._worker_id = worker_id
        self.database_source = database_source
        """Where the database URL came from, for error messages (the CLI: its flag)."""
        self.claim_lease_s: float | None = None
        """How long claimed items stay this worker's. None: the stages' own (long) leases. A
        `cai worker` sets it short and renews its leases with every heartbeat, so the items of a
        worker that died anywhere are free again within it."""

    @property
    def worker_id(self) -> str:
        """Who this process claims work as (a job's owner passes its own id)."""
        if self._worker_id is None:
            from cai.store.claims import new_worker_id

            self._worker_id = new_worker_id()
        return self._worker_id

    @functools.cached_property
    def engine(self) -> Engine:
        """The store's engine, created and upgraded to the current schema once per process."""
        from cai.store.db import ensure_schema, make_engine

        engine = make_engine(self.settings.database_url, self.database_source)
        ensure_schema(engine)
        return engine

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error."""
        from cai.store.db import session_scope

        with session_scope(self.engine) as session:
            yield session

    @property
    def cache_dir(self) -> Path | None:
        return Path(self.settings.cache_dir) if self.settings.cache_dir else None

    @functools.cached_property
    def templates(self) -> TemplateSet:
        from cai.templates import TemplateSet

        return TemplateSet(self.settings.templates_dir)

    def sampler(self, policy_name: str, model_ref: str, sampling: SamplingSettings) -> Sampler:
        """A sampler for one stored policy, with the settings' API key and model cache."""
        from cai.backends import make_sampler

        return make_sampler(
            sampling.backend,
            policy_name,
            model_ref,
            base_url=sampling.base_url,
            api_key=self.settings.resolved_judge_api_key(),
            batch_size=sampling.batch_size,
            cache_dir=self.cache_dir,
            rpm=sampling.policy_rpm,
            tpm=sampling.policy_tpm,
        )

    def judge(self, endpoint: JudgeEndpoint) -> Judge:
        """The judge an endpoint's settings describe (in-process on the embedded model without a
        base URL)."""
        from cai.backends import make_judge
        from cai.judge_round import JudgeSpec

        model = endpoint.resolved_model()
        backend, kind = make_judge(
            model,
            base_url=endpoint.judge_base_url,
            api_key=self.settings.resolved_judge_api_key(),
            timeout=endpoint.timeout,
            cache_dir=self.cache_dir,
            rpm=endpoint.rpm,
            tpm=endpoint.tpm,
            pool=endpoint.pool_endpoints(),
            concurrency=endpoint.concurrency,
        )
        spec = JudgeSpec(kind, model, endpoint.served_url(), endpoint.identity_params())
        warning = EMBEDDED_JUDGE_WARNING if kind == "hf" and model == EMBEDDED_MODEL else None
        return Judge(backend, spec, self.templates, warning)

    def judge_spec(self, endpoint: JudgeEndpoint) -> JudgeSpec:
        """Who an endpoint's settings make the judge (its identity, as `judge` computes it),
        without loading or calling it: for estimates."""
        from cai.judge_round import JudgeSpec

        served = endpoint.served_url()
        kind = "openai" if served else "hf"  # make_judge's choice of backend
        return JudgeSpec(kind, endpoint.resolved_model(), served, endpoint.identity_params())

    def leased(self, options: JudgeOptions) -> JudgeOptions:
        """Judge options with this workspace's claim lease, when it has one."""
        if self.claim_lease_s is None:
            return options
        return dataclasses.replace(options, lease_s=self.claim_lease_s)

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()
