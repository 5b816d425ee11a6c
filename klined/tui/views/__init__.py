"""The dashboard's three views: streams, completeness, jobs."""
