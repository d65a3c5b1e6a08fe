"""Offline tuning: traces of live requests (`epp record`); their replay and the tuner build on them."""
