"""Small building blocks of the dashboard: cell renderers and a few widgets."""
