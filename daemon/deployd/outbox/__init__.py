"""Telling people what happened (issue 15): commit statuses on the hosting service and
notifications, sent from a durable outbox.

`events` maps deployd's event rows to what is sent (public event names, commit statuses);
`writer` is the store's event listener that queues deliveries in the event's own
transaction; `providers` builds each hosting service's commit-status request; `formats`
builds the notification bodies (Slack, signed JSON); `sender` is the daemon task that drains
the outbox with retries. Urls and tokens come only from the config, at send time.
"""
