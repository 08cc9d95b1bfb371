"""A cluster of phxbroker nodes sharing broadcasts, presence, kicks and stats through Redis."""
