"""Entry points: parse a config, build the engines, train, clean up. Library code lives elsewhere."""
