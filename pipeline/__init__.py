"""How stages run and talk: data feed, transports, workers, runners, metrics, checkpoints."""
