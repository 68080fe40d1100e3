"""What every job runs on: settings, the Spark session, the command line, crash points, errors."""
