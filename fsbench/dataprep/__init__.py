"""Getting datasets onto disk and checking them: `fsbench data prepare | check | export-splits`.

`sources` is the one table of URLs, checksums and expected split sizes; `download` fetches
(resumable, verified), `extract` unpacks safely, `prepare` ties them together per dataset and
`check` reports what is present, complete and readable.
"""
