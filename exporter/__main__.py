import sys

from exporter.hup import catch_early

if sys.argv[1:2] not in (["track"], ["untrack"]):  # the API client keeps SIGHUP's default
    catch_early()  # before the heavy imports below: a SIGHUP now must not kill

from exporter.cli import main

raise SystemExit(main())
