"""The command line every entry point shares: ``--config``, ``--set``, logging and the Spark session.

A :class:`~jobs.runtime.errors.ConfigError`, wherever a job raises it, ends the process with one
line on stderr naming the key, and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from jobs.runtime.config import load_config
from jobs.runtime.errors import ConfigError
from jobs.runtime.settings import Config

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

CONFIG_ERROR_EXIT_CODE = 2
LOG_FORMAT = "%(asctime)s %(name)s %(message)s"


def job_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with the options every job takes; add the job's own to it."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help="environment file over the defaults (e.g. conf/local.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override one setting"
    )
    return parser


@dataclass
class Job:
    """A job's command line, its settings and, made on first use, its Spark session."""

    arguments: argparse.Namespace
    config: Config

    @cached_property
    def spark(self) -> SparkSession:
        from jobs.runtime.session import spark_session

        return spark_session(self.config.spark)


def run_job(parser: argparse.ArgumentParser, body: Callable[[Job], int], argv: Sequence[str] | None = None) -> int:
    """Parse the command line, load the settings and run ``body``; a bad setting is one line and exit code 2."""
    arguments = parser.parse_args(argv)
    configure_logging()
    try:
        job = Job(arguments, load_config(arguments.config, arguments.overrides))
        return body(job)
    except ConfigError as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE


def configure_logging() -> None:
    """The project's loggers at INFO on stderr; everyone else's (py4j's chatter among them) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("lambda_learner").setLevel(logging.INFO)
