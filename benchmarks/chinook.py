"""A database shaped like the Chinook sample database (https://github.com/lerocha/chinook-database): its 11 tables,
their keys and declared foreign keys (a graph four levels deep: Artist <- Album <- Track <- InvoiceLine, and Employee
referencing itself), NUMERIC prices, and its row counts at `scale` 1 (15,607 rows). Generated rather than
downloaded: the suite and the benchmarks run offline. Written through stdlib sqlite3 as an application would."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE Artist (ArtistId INTEGER PRIMARY KEY, Name NVARCHAR(120));
CREATE TABLE Genre (GenreId INTEGER PRIMARY KEY, Name NVARCHAR(120));
CREATE TABLE MediaType (MediaTypeId INTEGER PRIMARY KEY, Name NVARCHAR(120));
CREATE TABLE Album (AlbumId INTEGER PRIMARY KEY, Title NVARCHAR(160) NOT NULL,
                    ArtistId INTEGER NOT NULL REFERENCES Artist (ArtistId));
CREATE TABLE Track (TrackId INTEGER PRIMARY KEY, Name NVARCHAR(200) NOT NULL,
                    AlbumId INTEGER REFERENCES Album (AlbumId),
                    MediaTypeId INTEGER NOT NULL REFERENCES MediaType (MediaTypeId),
                    GenreId INTEGER REFERENCES Genre (GenreId), Composer NVARCHAR(220),
                    Milliseconds INTEGER NOT NULL, Bytes INTEGER, UnitPrice NUMERIC(10,2) NOT NULL);
CREATE TABLE Playlist (PlaylistId INTEGER PRIMARY KEY, Name NVARCHAR(120));
CREATE TABLE PlaylistTrack (PlaylistId INTEGER NOT NULL REFERENCES Playlist (PlaylistId),
                            TrackId INTEGER NOT NULL REFERENCES Track (TrackId),
                            CONSTRAINT PK_PlaylistTrack PRIMARY KEY (PlaylistId, TrackId));
CREATE TABLE Employee (EmployeeId INTEGER PRIMARY KEY, LastName NVARCHAR(20) NOT NULL,
                       FirstName NVARCHAR(20) NOT NULL, Title NVARCHAR(30),
                       ReportsTo INTEGER REFERENCES Employee (EmployeeId), BirthDate DATETIME, HireDate DATETIME,
                       Email NVARCHAR(60));
CREATE TABLE Customer (CustomerId INTEGER PRIMARY KEY, FirstName NVARCHAR(40) NOT NULL,
                       LastName NVARCHAR(20) NOT NULL, Company NVARCHAR(80), Country NVARCHAR(40),
                       Email NVARCHAR(60) NOT NULL, SupportRepId INTEGER REFERENCES Employee (EmployeeId));
CREATE TABLE Invoice (InvoiceId INTEGER PRIMARY KEY, CustomerId INTEGER NOT NULL REFERENCES Customer (CustomerId),
                      InvoiceDate DATETIME NOT NULL, BillingCountry NVARCHAR(40), Total NUMERIC(10,2) NOT NULL);
CREATE TABLE InvoiceLine (InvoiceLineId INTEGER PRIMARY KEY,
                          InvoiceId INTEGER NOT NULL REFERENCES Invoice (InvoiceId),
                          TrackId INTEGER NOT NULL REFERENCES Track (TrackId), UnitPrice NUMERIC(10,2) NOT NULL,
                          Quantity INTEGER NOT NULL);
CREATE INDEX IFK_AlbumArtistId ON Album (ArtistId);
CREATE INDEX IFK_TrackAlbumId ON Track (AlbumId);
CREATE INDEX IFK_InvoiceLineTrackId ON InvoiceLine (TrackId);
"""

TABLES = ["Album", "Artist", "Customer", "Employee", "Genre", "Invoice", "InvoiceLine", "MediaType", "Playlist",
          "PlaylistTrack", "Track"]  # alphabetical: the order a user resyncing table by table would pick
COUNTS = {"Artist": 275, "Genre": 25, "MediaType": 5, "Album": 347, "Track": 3503, "Playlist": 18,
          "PlaylistTrack": 8715, "Employee": 8, "Customer": 59, "Invoice": 412, "InvoiceLine": 2240}


def build(path: Path, scale: float = 1.0, seed: int = 7) -> int:
    """Write the database at `path` (WAL, foreign keys on as the app runs them) with COUNTS times `scale` rows of
    each table (at least one); the number of rows written."""
    rng = random.Random(seed)
    n = {table: max(1, round(count * scale)) for table, count in COUNTS.items()}
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.executescript(SCHEMA)
    with conn:
        conn.executemany("INSERT INTO Artist VALUES (?, ?)", [(i, f"Artist {i}") for i in range(1, n["Artist"] + 1)])
        conn.executemany("INSERT INTO Genre VALUES (?, ?)", [(i, f"Genre {i}") for i in range(1, n["Genre"] + 1)])
        conn.executemany("INSERT INTO MediaType VALUES (?, ?)",
                         [(i, f"Media {i}") for i in range(1, n["MediaType"] + 1)])
        conn.executemany("INSERT INTO Album VALUES (?, ?, ?)",
                         [(i, f"Album {i}", rng.randint(1, n["Artist"])) for i in range(1, n["Album"] + 1)])
        conn.executemany("INSERT INTO Track VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            (i, f"Track {i}", rng.randint(1, n["Album"]), rng.randint(1, n["MediaType"]), rng.randint(1, n["Genre"]),
             f"Composer {i % 97}" if i % 3 else None, rng.randint(60_000, 600_000), rng.randint(10**6, 10**7),
             "0.99" if i % 10 else "1.99") for i in range(1, n["Track"] + 1)])
        conn.executemany("INSERT INTO Playlist VALUES (?, ?)",
                         [(i, f"Playlist {i}") for i in range(1, n["Playlist"] + 1)])
        pairs = set()
        while len(pairs) < min(n["PlaylistTrack"], n["Playlist"] * n["Track"]):
            pairs.add((rng.randint(1, n["Playlist"]), rng.randint(1, n["Track"])))
        conn.executemany("INSERT INTO PlaylistTrack VALUES (?, ?)", sorted(pairs))
        conn.executemany("INSERT INTO Employee VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
            (i, f"Last{i}", f"First{i}", "Sales", None if i == 1 else rng.randint(1, i - 1), "1970-01-01 00:00:00",
             "2002-08-14 00:00:00", f"e{i}@chinook.test") for i in range(1, n["Employee"] + 1)])
        conn.executemany("INSERT INTO Customer VALUES (?, ?, ?, ?, ?, ?, ?)", [
            (i, f"First{i}", f"Last{i}", None, "Brazil", f"c{i}@chinook.test", rng.randint(1, n["Employee"]))
            for i in range(1, n["Customer"] + 1)])
        conn.executemany("INSERT INTO Invoice VALUES (?, ?, ?, ?, ?)", [
            (i, rng.randint(1, n["Customer"]), "2021-01-01 00:00:00", "Brazil", "3.96")
            for i in range(1, n["Invoice"] + 1)])
        conn.executemany("INSERT INTO InvoiceLine VALUES (?, ?, ?, ?, ?)", [
            (i, rng.randint(1, n["Invoice"]), rng.randint(1, n["Track"]), "0.99", 1)
            for i in range(1, n["InvoiceLine"] + 1)])
    total = sum(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES)
    conn.close()
    return total
