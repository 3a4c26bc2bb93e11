"""What crosses MQTT: topic names (``topics``) and the messages — host commands (``commands``),
the bundle transfer (``chunks``) and device reports (``reports``) — with their shared JSON rules
(``codec``) and command signatures (``signed``)."""
