"""Entry point of ``slimstream``: every command module registered on :data:`cli.base.cli`; click's usage
errors become one line and exit code 2."""

from __future__ import annotations

import sys

import typer
from aiokafka.errors import KafkaConnectionError
from typer._click import exceptions as click_exc  # typer >= 0.29 vendors click

# Importing a command module registers its commands; ``--help`` lists them in this order.
from cli import worker  # noqa: F401,I001  (registration)
from cli import up, events, deploy, models, rankers, teacher, evaluate, retrain, forget, ab  # noqa: F401,E402
from cli.base import cli, load_settings


def main(argv: list[str] | None = None) -> None:
    """Entry point: click's usage errors become one line and exit code 2."""
    command = typer.main.get_command(cli)
    try:
        result = command.main(args=argv, prog_name="slimstream", standalone_mode=False)
    except click_exc.UsageError as exc:  # includes BadParameter, NoSuchOption, MissingParameter
        message = " ".join(exc.format_message().split())
        print(f"slimstream: error: {message}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except KafkaConnectionError as exc:
        settings = load_settings()
        print(f"slimstream: error: cannot reach Kafka at {settings.kafka.bootstrap_servers} "
              f"(KAFKA_BOOTSTRAP_SERVERS): {exc}", file=sys.stderr)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    # Without standalone mode click returns an Exit's code instead of exiting.
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
