//! The JSON of the generated types must match what etcd 3.5's gRPC gateway
//! reads and prints. The expected strings are taken from real etcd
//! transcripts, so they are compared byte for byte (etcd prints fields in
//! proto declaration order).

use bytes::Bytes;
use etcd_api::etcdserverpb::{
    AlarmRequest, AlarmType, Compare, LeaseGrantRequest, LeaseGrantResponse,
    LeaseTimeToLiveResponse, Member, MemberListResponse, PutRequest, RangeRequest, RangeResponse,
    RequestOp, ResponseHeader, TxnRequest, TxnResponse, WatchCreateRequest, WatchRequest,
    WatchResponse, alarm_request, compare, request_op, response_op, watch_request,
};
use etcd_api::mvccpb::{Event, KeyValue, event};

fn header() -> ResponseHeader {
    ResponseHeader {
        cluster_id: 13455796455940752355,
        member_id: 443629905751424238,
        revision: 4,
        raft_term: 2,
    }
}

const HEADER_JSON: &str = r#"{"cluster_id":"13455796455940752355","member_id":"443629905751424238","revision":"4","raft_term":"2"}"#;

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("generated types always serialize")
}

#[test]
fn put_request_accepts_camel_case() {
    let req: PutRequest =
        serde_json::from_str(r#"{"key":"Zm9v","value":"YmFy","prevKv":true}"#).unwrap();
    assert_eq!(req.key, Bytes::from_static(b"foo"));
    assert_eq!(req.value, Bytes::from_static(b"bar"));
    assert!(req.prev_kv);
    assert_eq!(req.lease, 0);
}

#[test]
fn put_request_accepts_proto_names_and_ignores_unknown_fields() {
    let req: PutRequest =
        serde_json::from_str(r#"{"key":"Zm9v","value":"YmFy","prev_kv":true,"bogus":1}"#).unwrap();
    assert_eq!(req.key, Bytes::from_static(b"foo"));
    assert_eq!(req.value, Bytes::from_static(b"bar"));
    assert!(req.prev_kv);
}

#[test]
fn put_request_prints_proto_names() {
    let req = PutRequest {
        key: Bytes::from_static(b"foo"),
        value: Bytes::from_static(b"bar"),
        prev_kv: true,
        ..Default::default()
    };
    assert_eq!(
        to_json(&req),
        r#"{"key":"Zm9v","value":"YmFy","prev_kv":true}"#
    );
}

#[test]
fn range_response_matches_etcd() {
    let resp = RangeResponse {
        header: Some(header()),
        kvs: vec![KeyValue {
            key: Bytes::from_static(b"foo"),
            create_revision: 2,
            mod_revision: 4,
            version: 3,
            value: Bytes::from_static(b"bar"),
            lease: 0,
        }],
        more: false,
        count: 1,
    };
    let expected = format!(
        r#"{{"header":{HEADER_JSON},"kvs":[{{"key":"Zm9v","create_revision":"2","mod_revision":"4","version":"3","value":"YmFy"}}],"count":"1"}}"#
    );
    assert_eq!(to_json(&resp), expected);
    // And it reads back to the same message.
    let back: RangeResponse = serde_json::from_str(&expected).unwrap();
    assert_eq!(back, resp);
}

#[test]
fn range_request_enums_by_name_or_number() {
    let req: RangeRequest =
        serde_json::from_str(r#"{"key":"YQ==","sort_order":"DESCEND","sortTarget":4}"#).unwrap();
    assert_eq!(req.sort_order, 2);
    assert_eq!(req.sort_target, 4);
    assert_eq!(
        to_json(&req),
        r#"{"key":"YQ==","sort_order":"DESCEND","sort_target":"VALUE"}"#
    );
    // Names are case-sensitive, as in etcd.
    assert!(serde_json::from_str::<RangeRequest>(r#"{"sort_order":"descend"}"#).is_err());
}

#[test]
fn lease_grant_request_ttl_as_number_or_string() {
    let req: LeaseGrantRequest = serde_json::from_str(r#"{"TTL":30}"#).unwrap();
    assert_eq!(req, LeaseGrantRequest { ttl: 30, id: 0 });
    let req: LeaseGrantRequest = serde_json::from_str(r#"{"TTL":"30","ID":"777"}"#).unwrap();
    assert_eq!(req, LeaseGrantRequest { ttl: 30, id: 777 });
    // Lowercase "ttl" is not the field: etcd ignores it, and so do we.
    let req: LeaseGrantRequest = serde_json::from_str(r#"{"ttl":30}"#).unwrap();
    assert_eq!(req.ttl, 0);
}

#[test]
fn lease_grant_response_matches_etcd() {
    let resp = LeaseGrantResponse {
        header: Some(header()),
        id: 777,
        ttl: 30,
        error: String::new(),
    };
    assert_eq!(
        to_json(&resp),
        format!(r#"{{"header":{HEADER_JSON},"ID":"777","TTL":"30"}}"#)
    );
}

#[test]
fn lease_time_to_live_response_uses_granted_ttl() {
    let resp = LeaseTimeToLiveResponse {
        header: Some(header()),
        id: 777,
        ttl: 28,
        granted_ttl: 30,
        keys: vec![Bytes::from_static(b"foo")],
    };
    let json = format!(
        r#"{{"header":{HEADER_JSON},"ID":"777","TTL":"28","grantedTTL":"30","keys":["Zm9v"]}}"#
    );
    assert_eq!(to_json(&resp), json);
    let back: LeaseTimeToLiveResponse = serde_json::from_str(&json).unwrap();
    assert_eq!(back, resp);
}

#[test]
fn txn_request_with_proto_names() {
    let json = r#"{"compare":[{"target":"VALUE","result":"EQUAL","key":"Zm9v","value":"YmFy"}],"success":[{"request_range":{"key":"Zm9v"}}]}"#;
    let txn: TxnRequest = serde_json::from_str(json).unwrap();
    assert_eq!(
        txn,
        TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Value as i32,
                key: Bytes::from_static(b"foo"),
                target_union: Some(compare::TargetUnion::Value(Bytes::from_static(b"bar"))),
                range_end: Bytes::new(),
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: Bytes::from_static(b"foo"),
                    ..Default::default()
                })),
            }],
            failure: vec![],
        }
    );
    // EQUAL is the default and is omitted on output.
    assert_eq!(
        to_json(&txn),
        r#"{"compare":[{"target":"VALUE","key":"Zm9v","value":"YmFy"}],"success":[{"request_range":{"key":"Zm9v"}}]}"#
    );
}

#[test]
fn txn_request_with_camel_case() {
    let json = r#"{"compare":[{"target":"CREATE","result":"GREATER","key":"Zm9v","createRevision":"5"}],"failure":[{"requestPut":{"key":"Zm9v","value":"YmFy","prevKv":true}}]}"#;
    let txn: TxnRequest = serde_json::from_str(json).unwrap();
    assert_eq!(
        txn.compare[0].result,
        compare::CompareResult::Greater as i32
    );
    assert_eq!(txn.compare[0].target, compare::CompareTarget::Create as i32);
    assert_eq!(
        txn.compare[0].target_union,
        Some(compare::TargetUnion::CreateRevision(5))
    );
    let Some(request_op::Request::RequestPut(put)) = &txn.failure[0].request else {
        panic!("expected a put, got {:?}", txn.failure[0]);
    };
    assert_eq!(put.value, Bytes::from_static(b"bar"));
    assert!(put.prev_kv);
}

#[test]
fn txn_unknown_enum_name_is_an_error() {
    let json = r#"{"compare":[{"target":"BOGUS","key":"Zm9v"}]}"#;
    assert!(serde_json::from_str::<TxnRequest>(json).is_err());
}

#[test]
fn txn_response_keeps_empty_sub_messages() {
    // etcd prints a present but empty message as {} (nested txn headers).
    let resp = TxnResponse {
        header: Some(header()),
        succeeded: true,
        responses: vec![
            etcd_api::etcdserverpb::ResponseOp {
                response: Some(response_op::Response::ResponseTxn(TxnResponse {
                    header: Some(ResponseHeader::default()),
                    succeeded: false,
                    responses: vec![],
                })),
            },
            etcd_api::etcdserverpb::ResponseOp {
                response: Some(response_op::Response::ResponseDeleteRange(
                    etcd_api::etcdserverpb::DeleteRangeResponse {
                        header: Some(ResponseHeader {
                            revision: 9,
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                )),
            },
        ],
    };
    assert_eq!(
        to_json(&resp),
        format!(
            r#"{{"header":{HEADER_JSON},"succeeded":true,"responses":[{{"response_txn":{{"header":{{}}}}}},{{"response_delete_range":{{"header":{{"revision":"9"}}}}}}]}}"#
        )
    );
}

#[test]
fn watch_create_request() {
    let req: WatchRequest =
        serde_json::from_str(r#"{"create_request":{"key":"Yg==","watch_id":7}}"#).unwrap();
    assert_eq!(
        req,
        WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: Bytes::from_static(b"b"),
                    watch_id: 7,
                    ..Default::default()
                }
            )),
        }
    );
    let camel: WatchRequest =
        serde_json::from_str(r#"{"createRequest":{"key":"Yg==","watchId":"7"}}"#).unwrap();
    assert_eq!(camel, req);
    assert_eq!(
        to_json(&req),
        r#"{"create_request":{"key":"Yg==","watch_id":"7"}}"#
    );
}

#[test]
fn watch_progress_request_is_an_empty_object() {
    let req: WatchRequest = serde_json::from_str(r#"{"progress_request":{}}"#).unwrap();
    assert!(matches!(
        req.request_union,
        Some(watch_request::RequestUnion::ProgressRequest(_))
    ));
    assert_eq!(to_json(&req), r#"{"progress_request":{}}"#);
}

#[test]
fn watch_response_with_events() {
    let resp = WatchResponse {
        header: Some(header()),
        watch_id: 7,
        events: vec![
            Event {
                r#type: event::EventType::Put as i32,
                kv: Some(KeyValue {
                    key: Bytes::from_static(b"foo"),
                    create_revision: 2,
                    mod_revision: 3,
                    version: 2,
                    value: Bytes::from_static(b"bar"),
                    lease: 0,
                }),
                prev_kv: None,
            },
            Event {
                r#type: event::EventType::Delete as i32,
                kv: Some(KeyValue {
                    key: Bytes::from_static(b"foo"),
                    mod_revision: 4,
                    ..Default::default()
                }),
                prev_kv: None,
            },
        ],
        ..Default::default()
    };
    let json = format!(
        r#"{{"header":{HEADER_JSON},"watch_id":"7","events":[{{"kv":{{"key":"Zm9v","create_revision":"2","mod_revision":"3","version":"2","value":"YmFy"}}}},{{"type":"DELETE","kv":{{"key":"Zm9v","mod_revision":"4"}}}}]}}"#
    );
    assert_eq!(to_json(&resp), json);
    let back: WatchResponse = serde_json::from_str(&json).unwrap();
    assert_eq!(back, resp);

    // A created notice: watch_id 0 is omitted, created is printed.
    let created = WatchResponse {
        header: Some(header()),
        created: true,
        ..Default::default()
    };
    assert_eq!(
        to_json(&created),
        format!(r#"{{"header":{HEADER_JSON},"created":true}}"#)
    );
}

#[test]
fn member_list_response_matches_etcd() {
    let resp = MemberListResponse {
        header: Some(ResponseHeader {
            cluster_id: 13455796455940752355,
            member_id: 443629905751424238,
            revision: 0,
            raft_term: 2,
        }),
        members: vec![Member {
            id: 443629905751424238,
            name: "default".into(),
            peer_ur_ls: vec!["http://localhost:2380".into()],
            client_ur_ls: vec!["http://localhost:2379".into()],
            is_learner: false,
        }],
    };
    let json = r#"{"header":{"cluster_id":"13455796455940752355","member_id":"443629905751424238","raft_term":"2"},"members":[{"ID":"443629905751424238","name":"default","peerURLs":["http://localhost:2380"],"clientURLs":["http://localhost:2379"]}]}"#;
    assert_eq!(to_json(&resp), json);
    let back: MemberListResponse = serde_json::from_str(json).unwrap();
    assert_eq!(back, resp);
}

#[test]
fn alarm_request_matches_etcd() {
    let json = r#"{"action":"ACTIVATE","memberID":"443629905751424238","alarm":"NOSPACE"}"#;
    let req: AlarmRequest = serde_json::from_str(json).unwrap();
    assert_eq!(
        req,
        AlarmRequest {
            action: alarm_request::AlarmAction::Activate as i32,
            member_id: 443629905751424238,
            alarm: AlarmType::Nospace as i32,
        }
    );
    assert_eq!(to_json(&req), json);
    // memberID as a JSON number works too.
    let req2: AlarmRequest =
        serde_json::from_str(r#"{"action":1,"memberID":443629905751424238,"alarm":1}"#).unwrap();
    assert_eq!(req2, req);
}

#[test]
fn bad_base64_key_is_an_error() {
    assert!(serde_json::from_str::<PutRequest>(r#"{"key":"not base64!","value":"YmFy"}"#).is_err());
    assert!(serde_json::from_str::<RangeRequest>(r#"{"key":"Zm9v*"}"#).is_err());
    // Bytes are strings, not arrays of numbers.
    assert!(serde_json::from_str::<RangeRequest>(r#"{"key":[102,111,111]}"#).is_err());
}

#[test]
fn int64_rejects_non_integers() {
    assert!(serde_json::from_str::<LeaseGrantRequest>(r#"{"TTL":"abc"}"#).is_err());
    assert!(serde_json::from_str::<LeaseGrantRequest>(r#"{"TTL":1.5}"#).is_err());
    assert!(serde_json::from_str::<AlarmRequest>(r#"{"memberID":-1}"#).is_err());
}

#[test]
fn bytes_print_as_padded_standard_base64() {
    let req = PutRequest {
        key: Bytes::from_static(b"a"),
        value: Bytes::from_static(&[0xfb, 0xff]),
        ..Default::default()
    };
    assert_eq!(to_json(&req), r#"{"key":"YQ==","value":"+/8="}"#);
}

#[test]
fn descriptor_set_is_exported() {
    use prost::Message;
    let set = prost_types_free_decode(etcd_api::FILE_DESCRIPTOR_SET);
    for name in [
        "mvccpb/kv.proto",
        "authpb/auth.proto",
        "etcdserverpb/rpc.proto",
        "v3lockpb/v3lock.proto",
        "v3electionpb/v3election.proto",
    ] {
        assert!(
            set.contains(&name.to_string()),
            "{name} missing from {set:?}"
        );
    }

    /// Decodes just the file names (field 1 of each FileDescriptorProto, itself
    /// field 1 of the set) without a prost-types dependency.
    fn prost_types_free_decode(buf: &[u8]) -> Vec<String> {
        #[derive(Clone, PartialEq, Message)]
        struct Set {
            #[prost(message, repeated, tag = "1")]
            file: Vec<File>,
        }
        #[derive(Clone, PartialEq, Message)]
        struct File {
            #[prost(string, tag = "1")]
            name: String,
        }
        Set::decode(buf)
            .expect("valid descriptor set")
            .file
            .into_iter()
            .map(|f| f.name)
            .collect()
    }
}
