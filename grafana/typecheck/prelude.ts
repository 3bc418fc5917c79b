import type { AnnotationQuery, DataQuery, Dashboard } from "@grafana/schema";

// JSON holds strings where the schema has string enums (MappingType,
// FieldColorModeId, ...): check each against the enum's values instead.
type Json<T> = T extends string
  ? `${T}`
  : T extends (infer U)[]
    ? Json<U>[]
    : T extends object
      ? { [K in keyof T]: Json<T[K]> }
      : T;

// The Prometheus data source's query, which @grafana/schema leaves to the
// plugin: only the fields this dashboard uses.
interface PrometheusQuery extends DataQuery {
  expr: string;
  interval?: string;
}

type Board = Omit<Dashboard, "annotations"> & {
  annotations?: { list?: AnnotationQuery<PrometheusQuery>[] };
};

export const dashboard: Json<Board> =
