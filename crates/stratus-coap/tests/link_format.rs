//! CoRE Link Format (RFC 6690): rendering of `/.well-known/core` and query filtering (§4.1).

use stratus_coap::link_format::{filter, render, well_known_core, LinkResource};

fn resources() -> Vec<LinkResource> {
    vec![
        LinkResource::new("/.well-known/core").ct(40),
        LinkResource::new("/telemetry")
            .rt("stratus.telemetry")
            .interface("core.p")
            .ct(50),
        LinkResource::new("/config")
            .rt("stratus.config")
            .rt("core.rd-config")
            .interface("core.p")
            .ct(50)
            .ct(60)
            .observable(),
        LinkResource::new("/firmware/fw1")
            .rt("stratus.firmware")
            .ct(42)
            .size(204800),
        LinkResource::new("/upload").title("Upload \"area\""),
    ]
}

fn hrefs(queries: &[&str]) -> Vec<String> {
    let r = resources();
    filter(&r, queries)
        .into_iter()
        .map(|l| l.href.clone())
        .collect()
}

#[test]
fn renders_every_attribute() {
    assert_eq!(
        render(&resources()),
        concat!(
            "</.well-known/core>;ct=40,",
            "</telemetry>;rt=\"stratus.telemetry\";if=\"core.p\";ct=50,",
            "</config>;rt=\"stratus.config core.rd-config\";if=\"core.p\";ct=\"50 60\";obs,",
            "</firmware/fw1>;rt=\"stratus.firmware\";ct=42;sz=204800,",
            "</upload>;title=\"Upload \\\"area\\\"\""
        )
    );
    assert_eq!(render(&[]), "");
}

#[test]
fn href_with_unsafe_characters_is_percent_encoded() {
    let r = [LinkResource::new("/a b/<x>")];
    assert_eq!(render(&r), "</a%20b/%3Cx%3E>");
}

#[test]
fn no_query_lists_everything() {
    assert_eq!(hrefs(&[]).len(), 5);
}

#[test]
fn rt_exact_and_prefix() {
    assert_eq!(hrefs(&["rt=stratus.config"]), vec!["/config"]);
    // Any of several values matches.
    assert_eq!(hrefs(&["rt=core.rd-config"]), vec!["/config"]);
    assert_eq!(
        hrefs(&["rt=stratus.*"]),
        vec!["/telemetry", "/config", "/firmware/fw1"]
    );
    assert!(
        hrefs(&["rt=stratus"]).is_empty(),
        "no implicit prefix match"
    );
    assert_eq!(
        hrefs(&["rt=*"]).len(),
        3,
        "a bare * matches any resource that has rt"
    );
}

#[test]
fn href_filter_with_prefix() {
    assert_eq!(hrefs(&["href=/config"]), vec!["/config"]);
    assert_eq!(hrefs(&["href=/firmware/*"]), vec!["/firmware/fw1"]);
    assert!(hrefs(&["href=/firm"]).is_empty());
}

#[test]
fn ct_if_obs_sz_title_filters() {
    assert_eq!(hrefs(&["ct=50"]), vec!["/telemetry", "/config"]);
    assert_eq!(hrefs(&["ct=60"]), vec!["/config"]);
    assert_eq!(
        hrefs(&["ct=4*"]),
        vec!["/.well-known/core", "/firmware/fw1"]
    );
    assert_eq!(hrefs(&["if=core.p"]), vec!["/telemetry", "/config"]);
    assert_eq!(hrefs(&["obs"]), vec!["/config"]);
    assert_eq!(hrefs(&["sz=204800"]), vec!["/firmware/fw1"]);
    assert_eq!(hrefs(&["title=Upload*"]), vec!["/upload"]);
}

#[test]
fn unknown_attribute_matches_nothing_and_queries_combine() {
    assert!(hrefs(&["foo=bar"]).is_empty());
    assert_eq!(hrefs(&["ct=50", "obs"]), vec!["/config"]);
    assert!(hrefs(&["ct=42", "obs"]).is_empty());
}

#[test]
fn well_known_core_filters_and_renders() {
    let r = resources();
    assert_eq!(
        well_known_core(&r, &["rt=stratus.firmware"]),
        "</firmware/fw1>;rt=\"stratus.firmware\";ct=42;sz=204800"
    );
    assert_eq!(well_known_core(&r, &["rt=nothing"]), "");
}
