"""odmrd: an On-Demand Mail Relay (RFC 2645) provider and customer.

One message's path through the package:

    intake / enqueue / bounce ──> submission ──> spool            (taking mail)
    provider ──ATRN──> delivery <──jobs, results──> queuemgr ──> spool, bounce
                                                                  (handing it over)
    fetch ──> fetch_client ──> fetch_relay | fetch_server + fetch_mailbox
                                                                  (the customer)

`submission` is the one writer into the queue and `spool` its one reader;
`queuemgr` owns what happens to a message after a delivery attempt, and
`delivery` only speaks SMTP. README.md ("Development") describes each module.
"""

__version__ = "0.1.0"
