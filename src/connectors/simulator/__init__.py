"""A local supplier for the demo, the end-to-end tests and the benchmarks.

A seeded `Catalogue` of N items that `advance`s report by report; writers for every feed
format the parsers read (CSV, JSON, XML, EDI X12 846); atomic file drops; a REST supplier
with pagination, conditional requests and injectable faults; signed webhooks; and SFTP
and FTP servers over a folder. The servers run in background threads on 127.0.0.1.
"""

from connectors.simulator.catalogue import CASE_SIZE, Catalogue, Item, Page, gtin_check_digit
from connectors.simulator.edi846 import Separators, write_edi846
from connectors.simulator.faults import Fault, Faults
from connectors.simulator.files import drop
from connectors.simulator.ftp import FtpSupplier
from connectors.simulator.rest_server import PAGINATIONS, LoggedRequest, Pagination, RestSupplier
from connectors.simulator.sftp import SftpSupplier, client_key
from connectors.simulator.webhook import send_webhook, sign, webhook_body
from connectors.simulator.writers import EXTENSIONS, write, write_csv, write_json, write_xml

__all__ = [
    "CASE_SIZE",
    "EXTENSIONS",
    "PAGINATIONS",
    "Catalogue",
    "Fault",
    "Faults",
    "FtpSupplier",
    "Item",
    "LoggedRequest",
    "Page",
    "Pagination",
    "RestSupplier",
    "Separators",
    "SftpSupplier",
    "client_key",
    "drop",
    "gtin_check_digit",
    "send_webhook",
    "sign",
    "webhook_body",
    "write",
    "write_csv",
    "write_edi846",
    "write_json",
    "write_xml",
]
