"""Model-server signals: metrics scraping and name mappings per engine."""
